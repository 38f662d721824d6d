"""A DAGER-style reconstruction attack on what the server receives from one owner (issue 6).

DAGER (Petrov et al., "DAGER: Exact Gradient Inversion for Large Language Models", NeurIPS 2024)
checks, for every vocabulary token, whether its first-layer input lies in the row space of
the first layer's weight gradient. For LoRA, ``y = W0·x + s·B·A·x``, so

    ∂L/∂A = s·Bᵀ·Gᵀ·X            # (r, d_in); G (T, d_out) output gradients, X (T, d_in) inputs

and every row of ``∂L/∂A`` lies in ``span{x_t}``; when the batch holds ``T ≤ r`` distinct tokens
(and ``B ≠ 0``) the row space *is* ``span{x_t}``. The first block's q/k/v projections read
``x_t = RMSNorm(E[token_t])·g`` before RoPE, a function of the token alone, so the server can list
all ``V`` candidates and keep those whose distance to the row space is ~0. The three ``A`` of
q/k/v read the same ``X``; stacking their updates raises the usable rank to ``3r``.

The attack's own setting (and its limits, stated in the report, not hidden):

- one local **SGD** step (FedSGD): the update ``A₁ − A₀ = −lr·∂L/∂A`` keeps the row space. One
  Adam step from fresh moments is ``≈ −lr·sign(g)`` element-wise and leaves it: the check then
  recovers nothing even in the clear (tested; not a proof that Adam updates are safe).
- ``B ≠ 0``: a round after the first, where the owner starts from a merged global adapter (in
  round 1 ``B = 0`` and ``∂L/∂A = 0``: nothing to attack).
- the server knows the owner's starting ``A₀`` (its clear columns): exact for clear FedSGD, a
  gift in SHE-LoRA, where the owner re-factorizes the decrypted aggregate by SVD and the server
  only knows the clear part of that aggregate. It makes the protected figures an upper bound.
- the last token of each sequence gets no gradient through q/k/v (no loss reads its output
  under the causal mask) and is invisible unless it occurs earlier.

SHE-LoRA (Liu et al., arXiv 2505.21051) zeroes the encrypted columns of ``A`` in the clear
copy, so the server sees ``ΔA`` without the coordinates ``S``. Two attackers:

- *naive* (DAGER as published, what the paper evaluates): full candidates against the row space
  of the masked update. A true token's distance is at least ``‖x[S]‖/‖x‖``, so hiding the
  high-activation coordinates defeats the threshold. (Stacked q|k|v layers that hide different
  columns escape that bound: the union of their masked row spaces can hold the full inputs.)
- *position-aware*: the server knows ``S`` (it learns the positions in the negotiation) and
  drops those coordinates from the candidates too; ``span{x_t[∉S]}`` still contains every true
  token's projection, so nothing is protected unless ``d_in − |S|`` nears the rank.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from hecommon.errors import ConfigError
from hecommon.wire.federated import (
    Contribution,
    LayerContribution,
    RoundPlan,
    decode_contribution,
    encode_contribution,
)
from hecommon.wire.fedfields import unswap

from ..client_model import ClientModel, causal_lm_loss
from ..data import PackedData
from ..embedded import federated_aggregator
from .negotiate import budget_columns, make_proposal
from .reparam import svd_to_rank
from .selective import CkksKeys, select_and_encrypt
from .sensitivity import column_scores, lora_layers

#: Relative distance below which a candidate counts as inside the row space (fp32 updates sit at
#: ~1e-4; a random direction sits near 1 in 64 or more dimensions).
DEFAULT_THRESHOLD = 1e-2
#: The attack abstains when a random direction would pass the span check more often than this
#: (``chance_acceptance``): a row space that leaves too few dimensions out singles out no token.
MAX_CHANCE = 1e-3
#: Singular values below ``rank_rtol·σ_max`` are fp32 rounding of ``A₁ − A₀``, not tokens.
DEFAULT_RANK_RTOL = 1e-4


@dataclass(frozen=True)
class ObservedA:
    """One LoRA ``A`` reading the first block's input, as the server holds it.

    ``a`` is ``(r, d_in)`` in the original column order with the encrypted columns zero;
    ``hidden`` the encrypted column positions (known to the server from the negotiation).
    """

    layer: str
    a: np.ndarray
    hidden: np.ndarray

    def __post_init__(self) -> None:
        a = np.asarray(self.a, dtype=np.float64)
        hidden = np.unique(np.asarray(self.hidden, dtype=np.int64))
        if a.ndim != 2 or a.shape[0] < 1:
            raise ConfigError(f"dager: {self.layer}: A must be (r, d_in), got {a.shape}")
        if hidden.size and (hidden[0] < 0 or hidden[-1] >= a.shape[1]):
            raise ConfigError(f"dager: {self.layer}: hidden columns outside 0..{a.shape[1] - 1}")
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "hidden", hidden)

    def update(self, a_start: np.ndarray | None) -> np.ndarray:
        """``A₁ − A₀`` on the clear columns (``a`` itself when ``a_start`` is None: a sent update)."""
        if a_start is None:
            return self.a
        start = np.array(a_start, dtype=np.float64)
        if start.shape != self.a.shape:
            raise ConfigError(f"dager: {self.layer}: start A {start.shape} != received A {self.a.shape}")
        start[:, self.hidden] = 0.0  # the server knows nothing of the hidden columns
        return self.a - start


def first_layer_inputs(embedding: np.ndarray, norm_weight: np.ndarray, eps: float) -> np.ndarray:
    """``RMSNorm(E[v])·g`` for every token ``v``: (V, d) float64, the q/k/v input before RoPE."""
    emb = np.asarray(embedding, dtype=np.float64)
    g = np.asarray(norm_weight, dtype=np.float64)
    if emb.ndim != 2 or g.shape != (emb.shape[1],):
        raise ConfigError(f"dager: embedding {emb.shape} and norm weight {g.shape} do not match")
    return emb / np.sqrt(np.mean(emb * emb, axis=1, keepdims=True) + eps) * g


@dataclass(frozen=True)
class AttackResult:
    tokens: np.ndarray  # recovered token ids, sorted
    distances: np.ndarray  # (V,) relative distance of each candidate to the row space (inf: zero candidate)
    rank: int  # dimension of the row space found
    dims: int  # coordinates the check used (d_in, or d_in − |S| when position-aware)
    position_aware: bool


def row_space(updates: Sequence[np.ndarray], rank_rtol: float = DEFAULT_RANK_RTOL,
              noise_floor: float = 0.0) -> np.ndarray:
    """Orthonormal basis ``(k, d)`` of the stacked updates' row space: singular values above both
    ``rank_rtol·σ_max`` and ``noise_floor`` count."""
    stacked = np.concatenate([np.asarray(u, dtype=np.float64) for u in updates], axis=0)
    _, s, vt = np.linalg.svd(stacked, full_matrices=False)
    if s.size == 0 or s[0] == 0.0:
        return vt[:0]
    return vt[: int(np.sum(s > max(rank_rtol * s[0], noise_floor)))]


def fp32_noise_floor(received: Sequence[np.ndarray]) -> float:
    """Largest singular value expected from rounding ``A₁`` to float32 (the owner's parameters and
    the wire: ``u = 2⁻²⁴`` relative, uniform): ``σ_entry·(√n + √d)`` with ``σ_entry = u·rms(A₁)/√3``, doubled for margin."""
    stacked = np.concatenate([np.asarray(a, dtype=np.float64) for a in received], axis=0)
    rms = float(np.sqrt(np.mean(stacked * stacked))) if stacked.size else 0.0
    n, d = stacked.shape
    return 2.0 * 2.0 ** -24 * rms / np.sqrt(3.0) * (np.sqrt(n) + np.sqrt(d))


def span_distances(candidates: np.ndarray, basis: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """``‖c − P·c‖ / ‖c‖`` per candidate row (inf for a zero candidate, e.g. a padding embedding)."""
    out = np.empty(candidates.shape[0])
    for lo in range(0, candidates.shape[0], chunk):
        c = candidates[lo:lo + chunk]
        norm2 = np.einsum("ij,ij->i", c, c)
        proj = c @ basis.T  # (chunk, k)
        resid = np.sqrt(np.maximum(norm2 - np.einsum("ij,ij->i", proj, proj), 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            out[lo:lo + chunk] = np.where(norm2 > 0, resid / np.sqrt(norm2), np.inf)
    return out


def chance_acceptance(dims: int, rank: int, threshold: float) -> float:
    """About the largest share of random directions of ``R^dims`` within relative distance
    ``threshold`` of a ``rank``-dimensional subspace. A random unit vector's squared distance to it
    is the sum of ``m = dims − rank`` squared coordinates, about ``χ²_m / dims``, and Chernoff's bound
    gives ``P(χ²_m < x) ≤ (x·e/m)^(m/2)`` for ``x = threshold²·dims < m``. With 576 dimensions and a
    threshold of 1e-2: 0.39 at one dimension left (measured: 16 % of SmolLM2's vocabulary passed a
    ciphertext of rank 575), 1.2e-2 at three, 1.5e-3 at four, 1.7e-4 at five."""
    m = dims - rank
    x = threshold**2 * dims
    if m <= 0 or x >= m:
        return 1.0
    return float((x * math.e / m) ** (m / 2))


def dager_attack(observed: Sequence[ObservedA], candidates: np.ndarray,
                 a_start: dict[str, np.ndarray] | None = None, position_aware: bool = False,
                 threshold: float = DEFAULT_THRESHOLD, rank_rtol: float = DEFAULT_RANK_RTOL) -> AttackResult:
    """Recover the batch's token set from the first block's received ``A`` (DAGER's token check).

    ``observed``: the LoRA ``A`` of the layers reading the first block's input (q/k/v);
    ``candidates``: :func:`first_layer_inputs`; ``a_start``: the round's starting ``A`` per layer
    as the server knows it (None: ``a`` already is the update). ``position_aware`` drops the
    union of hidden columns from the check.
    """
    if not observed:
        raise ConfigError("dager: no observed LoRA A to attack")
    d = candidates.shape[1]
    for o in observed:
        if o.a.shape[1] != d:
            raise ConfigError(f"dager: {o.layer}: A has d_in {o.a.shape[1]}, candidates have {d}")
    if a_start is not None and (missing := [o.layer for o in observed if o.layer not in a_start]):
        raise ConfigError(f"dager: no starting A for {missing[0]!r}")
    updates = [o.update(None if a_start is None else a_start[o.layer]) for o in observed]
    received = [o.a for o in observed]
    if position_aware:
        keep = np.setdiff1d(np.arange(d), np.concatenate([o.hidden for o in observed]))
        updates, candidates = [u[:, keep] for u in updates], candidates[:, keep]
        received = [a[:, keep] for a in received]
    # A₁ − A₀ carries A₁'s float32 rounding: directions at that level are noise, not tokens
    floor = fp32_noise_floor(received) if a_start is not None else 0.0
    basis = row_space(updates, rank_rtol, floor)
    if basis.shape[0] == 0 or chance_acceptance(candidates.shape[1], basis.shape[0], threshold) > MAX_CHANCE:
        # no row space, or one that fills (nearly) every coordinate the check uses (an update of
        # full rank: noise, or a ciphertext read without its key, whose smallest singular values
        # may fall under rank_rtol by chance): random candidates lie in it, so the span check
        # singles out none, and the attack abstains rather than "recover" the vocabulary
        dist = np.full(candidates.shape[0], np.inf)
    else:
        dist = span_distances(candidates, basis)
    return AttackResult(np.flatnonzero(dist < threshold), dist, basis.shape[0], candidates.shape[1], position_aware)


def recovery_scores(recovered: np.ndarray, batch_ids: np.ndarray) -> dict[str, float]:
    """Recall over the batch's distinct tokens, precision, false positives, ROUGE-1 F on distinct ids.

    DAGER's ROUGE-1 compares reconstructed text to the batch; this attack returns a token set, so
    the comparable figure is the unigram F1 over distinct token ids (ROUGE-1 without counts).
    """
    truth = set(np.asarray(batch_ids).reshape(-1).tolist())
    got = set(np.asarray(recovered).reshape(-1).tolist())
    hits = len(truth & got)
    recall = hits / len(truth) if truth else 0.0
    precision = hits / len(got) if got else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"recall": recall, "precision": precision, "false_positives": float(len(got - truth)),
            "recovered": float(len(got)), "batch_unique": float(len(truth)), "rouge1_unique": f1}


# -- the server's view of C1's wire --------------------------------------------------------------

#: The LoRA layers that read the first block's input (RMSNorm of the embeddings, before RoPE).
FIRST_BLOCK_QKV = tuple(f"model.layers.0.self_attn.{m}_proj" for m in ("q", "k", "v"))


def observed_from_contribution(contribution: Contribution, plan: RoundPlan,
                               layers: Sequence[str] = FIRST_BLOCK_QKV) -> list[ObservedA]:
    """The clear ``A`` of ``layers`` as the server reads them from one owner's message.

    ``A`` arrives with its encrypted columns swapped to the end and zeroed; the server undoes the
    swap from the public plan (``unswap``) and knows the positions ``order[:k]``.
    """
    by_name = {x.name: x for x in contribution.layers}
    missing = [name for name in layers if name not in by_name]
    if missing:
        raise ConfigError(f"dager: the contribution has no layer {missing[0]!r}")
    out = []
    for name in layers:
        lay = by_name[name]
        order = plan.layer(name).order
        out.append(ObservedA(name, unswap(lay.a.astype(np.float64), order, lay.k), np.asarray(order[:lay.k])))
    return out


# -- the attack's own setting, for the tests and benchmarks/federated.py ---------------------------

@dataclass(frozen=True)
class VictimView:
    """What one SGD step of an owner puts in the server's hands, plus the truth to score against."""

    message: bytes  # the encoded Contribution, exactly as the server receives it
    plan: RoundPlan
    a_start: dict[str, np.ndarray]  # the round's starting A of the attacked layers (server's gift)
    batch_ids: np.ndarray  # the private batch (scoring only; never given to the attack)


def warm_start(client: ClientModel, data: PackedData, steps: int = 3, lr: float = 1e-2, seed: int = 0) -> None:
    """Put the owner where a round after the first starts: a merged adapter with ``B ≠ 0``.

    A few AdamW steps on the owner's data (round 1), then FlexLoRA's re-factorization of
    ``s·B·A`` to the owner's rank (``reparam.svd_to_rank``: ``A`` orthonormal rows, ``B = U·S/s``),
    which is what ``Owner.merge`` leaves after a round (here with this owner alone).
    """
    params = client.lora_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = np.random.default_rng(seed).permutation(len(data))
    for step in range(steps):
        ids, labels = data.batch([int(order[step % len(data)])])
        loss, n = causal_lm_loss(client(ids), labels)
        (loss / max(n, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for m in lora_layers(client).values():
            dw = m.scaling * (m.lora_B.weight.double() @ m.lora_A.weight.double()).numpy()
            a, b = svd_to_rank(dw, m.lora_A.weight.shape[0], m.scaling)
            m.lora_A.weight.copy_(torch.from_numpy(a))
            m.lora_B.weight.copy_(torch.from_numpy(b))


def one_step_contribution(client: ClientModel, batch_ids: torch.Tensor, calibration: PackedData,
                          budget: float, keys: CkksKeys, lr: float = 0.1, owner: str = "victim",
                          layers: Sequence[str] = FIRST_BLOCK_QKV, optimizer: str = "sgd") -> VictimView:
    """One owner, one round: sensitivity scoring on its own data, negotiation, ONE local step on
    ``batch_ids`` (B, S) (SGD, or Adam from fresh moments), selective encryption of ``layers``
    (SHE-LoRA §4.1–4.3, with the federated mode's own functions).

    Only ``layers`` go into the message: the attack reads nothing else, and encrypting the other
    layers would change nothing the server can see in these.
    """
    if optimizer not in ("sgd", "adam"):
        raise ConfigError(f"dager: optimizer {optimizer!r} is not 'sgd' or 'adam'")
    lora = lora_layers(client)
    scores = column_scores(client, calibration)
    shapes = {name: (lora[name].out_features, lora[name].in_features) for name in layers}
    rid = os.urandom(16)
    server = federated_aggregator(keys.public_bytes())
    proposal = make_proposal(rid, owner, keys.digest, {n: scores[n] for n in layers}, shapes, budget)
    plan, rejected = server.plan([proposal], shapes, rid)
    if rejected:
        raise ConfigError(f"dager: the negotiation rejected the proposal: {rejected}")
    a_start = {n: lora[n].lora_A.weight.detach().double().numpy().copy() for n in layers}
    local_step(client, batch_ids, lr, optimizer)
    parts = []
    for name in layers:
        m, pl = lora[name], plan.layer(name)
        k = min(budget_columns(budget, m.in_features), len(pl.order))
        a = m.lora_A.weight.detach().double().numpy()
        b_eff = m.scaling * m.lora_B.weight.detach().double().numpy()
        swapped, enc = select_and_encrypt(keys, a, b_eff, pl.order, k, int(batch_ids.shape[0]))
        parts.append(LayerContribution(name, m.out_features, m.in_features, a.shape[0], k,
                                       b_eff.astype(np.float32), swapped, enc))
    message = encode_contribution(Contribution(rid, owner, int(batch_ids.shape[0]), keys.digest, tuple(parts)))
    return VictimView(message, plan, a_start, batch_ids.numpy().copy())


@dataclass(frozen=True)
class SumView:
    """One SGD step of an owner under ``--scheme full``: the encrypted update as the server receives
    it, and (for the comparison only, never given to the encrypted attack) the same update in
    the clear with the round's starting product, as a clear FlexLoRA server would hold them."""

    message: bytes  # the encoded SumContribution
    clear_delta: dict[str, np.ndarray]  # s·B₁·A₁ of the attacked layers after the step
    delta_start: dict[str, np.ndarray]  # s·B₀·A₀: the round's start (the last merge, public in clear FlexLoRA)
    batch_ids: np.ndarray


def one_step_sum(client: ClientModel, batch_ids: torch.Tensor, keys: CkksKeys, lr: float = 0.1,
                 owner: str = "victim", layers: Sequence[str] = FIRST_BLOCK_QKV, size: int = 3) -> SumView:
    """One owner, one SGD step on ``batch_ids``, its update of ``layers`` encrypted as ``--scheme
    full`` sends it (``encsum.contribute``, one of ``size`` owners)."""
    from hecommon.wire.federated import encode

    from . import encsum

    lora = lora_layers(client)

    def products() -> dict[str, np.ndarray]:
        return {n: lora[n].scaling * (lora[n].lora_B.weight.detach().double()
                                      @ lora[n].lora_A.weight.detach().double()).numpy() for n in layers}

    start = products()
    local_step(client, batch_ids, lr)
    delta = products()
    shapes = {n: (lora[n].out_features, lora[n].in_features) for n in layers}
    c = encsum.contribute(keys, os.urandom(16), owner, delta, shapes, int(batch_ids.shape[0]), size)
    return SumView(encode(c, 1 << 30), delta, start, batch_ids.numpy().copy())


def observed_from_sum(message: bytes, layers: Sequence[str] = FIRST_BLOCK_QKV) -> list[ObservedA]:
    """The server's best reading of an encrypted update without the key: each value of ``b'``
    centered and scaled as if it were ``Δ'·m`` (the mask ``a·s`` it cannot remove left in),
    divided by the fixed-point scale; no position is hidden from it, none is known either."""
    from hecommon.he.bits import PackedRows
    from hecommon.he.params import get
    from hecommon.wire.federated import SumContribution, decode

    c = decode(message, 1 << 30, SumContribution)
    assert isinstance(c, SumContribution)
    params = get(c.params)
    b = PackedRows(c.bits, params.n, c.b).unpack().reshape(-1).astype(np.float64)
    b = np.where(b >= 2.0 ** (c.bits - 1), b - 2.0**c.bits, b) / 2.0 ** (c.bits - params.msg_bits + c.frac_bits)
    out, pos = [], 0
    by_name = {}
    for x in c.layers:
        by_name[x.name] = b[pos:pos + x.d_out * x.d_in].reshape(x.d_out, x.d_in)
        pos += x.d_out * x.d_in
    for name in layers:
        if name not in by_name:
            raise ConfigError(f"dager: the contribution has no layer {name!r}")
        out.append(ObservedA(name, by_name[name], np.zeros(0, dtype=np.int64)))
    return out


def attack_sum_message(view: SumView, candidates: np.ndarray, layers: Sequence[str] = FIRST_BLOCK_QKV,
                       clear: bool = False, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """The attack on an encrypted update as the server reads it (``observed_from_sum``) or, with
    ``clear``, on the same update sent in the clear (``s·B₁·A₁ − s·B₀·A₀``, rows in the span of the
    batch's inputs and of ``A₀``'s rows); scored against the batch."""
    if clear:  # each layer's update scaled to unit norm, so one layer's rows do not drown another's
        norm = {n: 1.0 / max(float(np.linalg.norm(view.clear_delta[n] - view.delta_start[n])), 1e-300) for n in layers}
        observed = [ObservedA(n, view.clear_delta[n] * norm[n], np.zeros(0, dtype=np.int64)) for n in layers]
        result = dager_attack(observed, candidates, {n: view.delta_start[n] * norm[n] for n in layers}, False,
                              threshold)
    else:
        result = dager_attack(observed_from_sum(view.message, layers), candidates, None, False, threshold)
    scores = recovery_scores(result.tokens, view.batch_ids)
    scores.update(rank=float(result.rank), dims=float(result.dims), hidden=0.0)
    return scores


def local_step(client: ClientModel, batch_ids: torch.Tensor, lr: float, optimizer: str = "sgd") -> None:
    """One local step on ``batch_ids``: plain SGD (FedSGD, the attack's setting), or Adam from fresh
    moments (as after ``Owner.merge``: ≈ −lr·sign(g) element-wise)."""
    loss, n = causal_lm_loss(client(batch_ids), batch_ids)
    client.zero_grad(set_to_none=True)
    (loss / max(n, 1)).backward()
    if optimizer == "sgd":
        with torch.no_grad():
            for p in client.lora_parameters():
                if p.grad is not None:
                    p -= lr * p.grad
    else:
        torch.optim.Adam(client.lora_parameters(), lr=lr).step()
    client.zero_grad(set_to_none=True)


def attack_message(view: VictimView, candidates: np.ndarray, layers: Sequence[str] = FIRST_BLOCK_QKV,
                   position_aware: bool = False, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """Decode the message as the server does, run the attack on ``layers``, score it."""
    observed = observed_from_contribution(decode_contribution(view.message), view.plan, layers)
    result = dager_attack(observed, candidates, view.a_start, position_aware, threshold)
    scores = recovery_scores(result.tokens, view.batch_ids)
    scores.update(rank=float(result.rank), dims=float(result.dims),
                  hidden=float(len(np.unique(np.concatenate([o.hidden for o in observed])))))
    return scores
