"""SHE-LoRA's server side (arXiv 2505.21051 §4.2–4.4; DESIGN §5): negotiation and column-aware aggregation.

With every coordinate encrypted (``--scheme full``, ``hecommon.he.fedsum``) there is no plan:
``aggregate_sum`` checks each owner's ``SumContribution`` (round, key digest, federation size,
parameters, layout, a seed no other owner used) and adds the ciphertexts mod ``2^bits``; it sees
nothing in the clear but names and shapes.

Pure logic, no broker (``fedworker.py`` is the RabbitMQ shell). The aggregator holds the round's
PUBLIC CKKS context only: one that carries a secret key is refused before anything else.

- ``plan``: every owner proposes its top-k column positions per layer (no scores); the global
  ordered list of a layer ranks the union by a Borda count (position ``p`` in a list of the
  longest length ``K`` scores ``K − p``), ties broken by the number of owners that proposed the
  column, then by the column index; its length is the largest budget ``K``. Each owner encrypts
  the prefix that fits its own budget, so the ciphertexts of all owners line up position by
  position (the negotiation that keeps ciphertexts from inflating, SHE-LoRA §4.2).
- ``aggregate``: clear parts as products ``Σ_i w_i·(s_i·B_i)·A_i`` (encrypted columns are zero in
  ``A_i``), encrypted parts summed ciphertext by ciphertext (position ``t`` of every owner holds
  ``w_i·s_i·B_i·a_{i,order[t]}``, right-aligned in the swapped ``A``), with per-position counts
  ``Σ w_i`` over the owners that encrypted it. ``w_i`` are the owners' sample counts. Ranks may
  differ (4, 8, 16…): only products are added, never factors. The owners then decrypt, add the
  clear part, divide by ``Σ w_i`` and reparameterize (FlexLoRA's weighted ``ΔW`` average, with
  a part of it never seen in the clear).

A malformed or mismatched contribution (bad bytes, another round or context, wrong layers or
shapes, a duplicated owner, unzeroed encrypted columns, a ciphertext that is not of this
context or not a fresh one at scale 2^40) is rejected with a clear reason and the round goes on
with the others. Should the sum still fail, ``aggregate`` raises ``HeloraError`` (the worker then
answers every owner of the round with it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tenseal as ts
from hecommon.errors import HeloraError, MalformedMessage, ParameterMismatch
from hecommon.he import params as he_params
from hecommon.he.bits import PackedRows
from hecommon.he.fedsum import SumScheme
from hecommon.wire.federated import (
    Aggregate,
    Contribution,
    LayerAggregate,
    LayerContribution,
    PlanLayer,
    Proposal,
    RoundPlan,
    SumAggregate,
    SumContribution,
    decode,
)
from hecommon.wire.fedfields import (
    CKKS_COEFF_BITS,
    CKKS_POLY_DEGREE,
    CKKS_SCALE_BITS,
    CKKS_SLOTS,
    MAX_CIPHERTEXT_BYTES,
    context_digest,
    global_order,
    unswap,
)


def check_public_context(data: bytes) -> ts.Context:
    """Deserialize the round's context; refuse a secret key or parameters other than ours."""
    try:
        ctx = ts.context_from(data)
    except Exception:
        raise MalformedMessage("context: not a serialized TenSEAL context") from None
    if ctx.is_private() or ctx.has_secret_key():
        # Never keep it: drop the object at once, say nothing else about it.
        del ctx
        raise ParameterMismatch("context: it carries a secret key; the server accepts only a public context")
    seal = ctx.seal_context().data
    n = seal.key_context_data().parms().poly_modulus_degree()
    bits = (seal.first_context_data().total_coeff_modulus_bit_count(),
            seal.key_context_data().total_coeff_modulus_bit_count())
    want = (CKKS_COEFF_BITS[0], sum(CKKS_COEFF_BITS))  # (data level, with the special prime)
    if n != CKKS_POLY_DEGREE or bits != want:
        raise ParameterMismatch(f"context: N = {n}, modulus bits {bits}; the federated mode uses "
                                f"N = {CKKS_POLY_DEGREE}, moduli {CKKS_COEFF_BITS}")
    return ctx


def clear_update(c: Contribution, plan: RoundPlan) -> dict[str, np.ndarray]:
    """What the server computes in the clear from one owner's message: ``s_i·B_i·A_i`` per layer,
    (d_out, d_in) float64, encrypted columns zero, original column order."""
    out = {}
    for lay in c.layers:
        a = unswap(lay.a.astype(np.float64), plan.layer(lay.name).order, lay.k)
        out[lay.name] = lay.b.astype(np.float64) @ a
    return out


class FederatedAggregator:
    """One federation's server state: its public context; ``plan`` and ``aggregate`` per round."""

    def __init__(self, public_context: bytes):
        self.ctx = check_public_context(public_context)
        self.public_context = public_context
        self.digest = context_digest(public_context)
        self._data_level = self.ctx.seal_context().data.first_parms_id()  # fresh ciphertexts live here

    # -- negotiation -------------------------------------------------------------------
    def plan(self, proposals: Sequence[Proposal], layers: Mapping[str, tuple[int, int]],
             rid: bytes) -> tuple[RoundPlan, dict[str, str]]:
        """The round's global ordered lists; ``layers`` are the adapter's public shapes."""
        accepted: dict[str, Proposal] = {}
        rejected: dict[str, str] = {}
        for p in proposals:
            try:
                self._check_header(p.owner, p.rid, p.ctx, rid, accepted)
                got = {x.name: (x.d_out, x.d_in) for x in p.layers}
                self._check_layers(got, layers)
                accepted[p.owner] = p
            except HeloraError as exc:
                rejected[p.owner if p.owner not in accepted else f"{p.owner} (duplicate)"] = str(exc)
        plan_layers = []
        for name, (d_out, d_in) in layers.items():
            tops = [x.top for p in accepted.values() for x in p.layers if x.name == name]
            plan_layers.append(PlanLayer(name, d_out, d_in, global_order(tops)))
        return RoundPlan(rid, self.digest, tuple(plan_layers)), rejected

    # -- aggregation -------------------------------------------------------------------
    def aggregate(self, plan: RoundPlan, contributions: Sequence[bytes | Contribution],
                  max_bytes: int = 1 << 30) -> tuple[Aggregate, dict[str, str]]:
        """Column-aware aggregation of every valid contribution; ``rejected`` names the others."""
        accepted, rejected = _accept(contributions, Contribution, lambda c, ok: self.check(plan, c, ok), max_bytes,
                                     plan.rid)
        total = sum(c.samples for c in accepted.values())
        try:
            layers = tuple(self._aggregate_layer(pl, [(c.samples, _layer(c, pl.name)) for c in accepted.values()])
                           for pl in plan.layers)
        except HeloraError:
            raise
        except (ValueError, RuntimeError, ArithmeticError) as exc:  # TenSEAL/numpy: checks should have caught it
            raise HeloraError(f"round {plan.rid.hex()}: aggregation failed ({type(exc).__name__}: "
                              f"{str(exc)[:120]})") from None
        return Aggregate(plan.rid, self.digest, total, tuple(accepted), layers), rejected

    def check(self, plan: RoundPlan, c: Contribution, accepted: Mapping[str, Contribution] = {}) -> None:
        """Raise ``HeloraError`` with the reason when ``c`` cannot join the round's aggregate."""
        self._check_header(c.owner, c.rid, c.ctx, plan.rid, accepted)
        self._check_layers({x.name: (x.d_out, x.d_in) for x in c.layers},
                           {x.name: (x.d_out, x.d_in) for x in plan.layers})
        for lay in c.layers:
            order = plan.layer(lay.name).order
            if lay.k > len(order):
                raise ParameterMismatch(f"{lay.name}: {lay.k} encrypted columns, the plan lists {len(order)}")
            if lay.k and np.any(lay.a[:, lay.d_in - lay.k:] != 0):
                raise MalformedMessage(f"{lay.name}: the encrypted columns are not zeroed in the clear copy of A")
            for blob in lay.enc:
                self._ciphertext(blob, lay.name)

    def _check_header(self, owner: str, rid: bytes, ctx: bytes, round_rid: bytes, accepted: Mapping) -> None:
        if owner in accepted:
            raise MalformedMessage(f"owner {owner!r}: a second message for this round (duplicated owner)")
        if rid != round_rid:
            raise ParameterMismatch(f"owner {owner!r}: round {rid.hex()} is not this round ({round_rid.hex()})")
        if ctx != self.digest:
            raise ParameterMismatch(f"owner {owner!r}: encrypted under another CKKS context than the round's")

    @staticmethod
    def _check_layers(got: Mapping[str, tuple[int, int]], want: Mapping[str, tuple[int, int]]) -> None:
        if set(got) != set(want):
            missing, extra = sorted(set(want) - set(got))[:3], sorted(set(got) - set(want))[:3]
            raise ParameterMismatch(f"layers do not match the round's (missing {missing}, unexpected {extra})")
        for name, shape in got.items():
            if tuple(shape) != tuple(want[name]):
                raise ParameterMismatch(f"{name}: shape (d_out, d_in) = {tuple(shape)}, the round's is {want[name]}")

    def _ciphertext(self, blob: bytes, where: str) -> ts.CKKSVector:
        if len(blob) > MAX_CIPHERTEXT_BYTES:
            raise MalformedMessage(f"{where}: ciphertext of {len(blob)} bytes")
        try:
            v = ts.ckks_vector_from(self.ctx, blob)
        except Exception:
            raise MalformedMessage(f"{where}: a ciphertext does not deserialize under the round's context") from None
        if v.size() != CKKS_SLOTS:
            raise MalformedMessage(f"{where}: a ciphertext of {v.size()} slots, not {CKKS_SLOTS}")
        # the sum adds ciphertexts as they are: one scale, one level, two polynomials (fresh
        # encryptions); anything else would break TenSEAL's addition for the whole round
        parts = v.ciphertext()
        if len(parts) != 1:
            raise MalformedMessage(f"{where}: a ciphertext in {len(parts)} parts, not 1")
        ct = parts[0]
        if ct.scale != 2.0 ** CKKS_SCALE_BITS:
            got = f"2^{math.log2(ct.scale):.4g}" if ct.scale > 0 else f"{ct.scale:g}"
            raise ParameterMismatch(f"{where}: a ciphertext at scale {got}, the round's is 2^{CKKS_SCALE_BITS}")
        if ct.parms_id() != self._data_level or ct.size() != 2 or not ct.is_ntt_form():
            raise ParameterMismatch(f"{where}: a ciphertext at another level or of size {ct.size()}; the round "
                                    f"adds fresh encryptions (data level, size 2)")
        return v

    def _aggregate_layer(self, pl: PlanLayer, parts: list[tuple[int, LayerContribution]]) -> LayerAggregate:
        clear = np.zeros((pl.d_out, pl.d_in), dtype=np.float64)
        counts = [0] * len(pl.order)
        sums: list[ts.CKKSVector] = []
        for w, lay in parts:
            # (d_out, r) @ (r, d_in): the product, never the factors, so ranks may differ
            clear += w * (lay.b.astype(np.float64) @ unswap(lay.a.astype(np.float64), pl.order, lay.k))
            for t in range(lay.k):
                counts[t] += w
            for c, blob in enumerate(lay.enc):
                v = self._ciphertext(blob, pl.name)
                if c < len(sums):
                    sums[c] += v
                else:
                    sums.append(v)
        return LayerAggregate(pl.name, pl.d_out, pl.d_in, clear.astype(np.float32), pl.order, tuple(counts),
                              tuple(s.serialize() for s in sums))


    # -- every coordinate encrypted (--scheme full) -------------------------------------
    def check_sum(self, c: SumContribution, rid: bytes, size: int,
                  accepted: Mapping[str, SumContribution] = {}) -> None:
        """Raise ``HeloraError`` with the reason when ``c`` cannot join round ``rid``'s encrypted sum
        of a federation of ``size`` owners (the first accepted contribution fixes the layout)."""
        self._check_header(c.owner, c.rid, c.ctx, rid, accepted)
        if c.size != size:
            raise ParameterMismatch(f"owner {c.owner!r}: encrypted for a federation of {c.size} owners; this "
                                    f"aggregator sums up to {size}")
        if len(accepted) >= size:
            raise ParameterMismatch(f"owner {c.owner!r}: the round already holds {size} contributions")
        if accepted:
            first = next(iter(accepted.values()))
            if c.key != first.key:
                raise ParameterMismatch(f"owner {c.owner!r}: encrypted under another sum key than the round's "
                                        f"(owners whose TenSEAL builds differ derive different keys)")
            if (c.params, c.frac_bits, c.bits) != (first.params, first.frac_bits, first.bits):
                raise ParameterMismatch(f"owner {c.owner!r}: parameters {c.params}, 2^{c.frac_bits}, {c.bits} bits; "
                                        f"the round's are {first.params}, 2^{first.frac_bits}, {first.bits} bits")
            if [(x.name, x.d_out, x.d_in) for x in c.layers] != [(x.name, x.d_out, x.d_in) for x in first.layers]:
                raise ParameterMismatch(f"owner {c.owner!r}: layers do not match the round's (names, shapes, order)")
            if any(c.seed == x.seed for x in accepted.values()):
                raise MalformedMessage(f"owner {c.owner!r}: a seed another owner of this round used (its a would "
                                       f"cancel against theirs)")

    def aggregate_sum(self, rid: bytes, contributions: Sequence[bytes | SumContribution], size: int,
                      max_bytes: int = 1 << 30) -> tuple[SumAggregate, dict[str, str]]:
        """The encrypted sum of every valid contribution mod ``2^bits``; ``rejected`` names the others."""
        accepted, rejected = _accept(contributions, SumContribution, lambda c, ok: self.check_sum(c, rid, size, ok),
                                     max_bytes, rid)
        return sum_contributions(list(accepted.values()), self.digest), rejected


def _accept(items: Sequence[Any], cls: type, check: Callable[[Any, dict[str, Any]], None], max_bytes: int,
            rid: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """Decode (bytes) and ``check`` each contribution against those accepted before it: (accepted by
    owner, rejected owner → reason; undecodable ones as ``#i``, repeats as ``owner (duplicate)``)."""
    accepted: dict[str, Any] = {}
    rejected: dict[str, str] = {}
    for i, item in enumerate(items):
        owner = item.owner if isinstance(item, cls) else f"#{i}"
        try:
            c = item if isinstance(item, cls) else decode(item, max_bytes, cls)
            owner = c.owner
            check(c, accepted)
            accepted[c.owner] = c
        except HeloraError as exc:
            rejected[owner if owner not in accepted else f"{owner} (duplicate)"] = str(exc)
    if not accepted:
        raise MalformedMessage(f"round {rid.hex()}: no valid contribution ({len(rejected)} rejected)")
    return accepted, rejected


def sum_contributions(cs: Sequence[SumContribution], digest: bytes) -> SumAggregate:
    """The ``SumAggregate`` of checked contributions (one layout, distinct owners and seeds)."""
    first = cs[0]
    params = he_params.get(first.params)
    scheme = SumScheme(first.size, params)
    total = scheme.add([PackedRows(first.bits, params.n, c.b) for c in cs])
    return SumAggregate(first.rid, digest, first.params, first.size, first.frac_bits, first.bits, first.key,
                        first.layers,
                        tuple(c.owner for c in cs), tuple(c.seed for c in cs), bytes(total.data))


def _layer(c: Contribution, name: str) -> LayerContribution:
    return next(x for x in c.layers if x.name == name)
