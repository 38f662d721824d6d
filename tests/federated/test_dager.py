"""DAGER-style reconstruction by the server, on exactly what it receives (issue 6; DESIGN §5).

The attack's own setting: one owner, a round after the first (a merged adapter, ``B ≠ 0``), ONE
SGD step (lr 0.1) on a private batch of 9 distinct byte tokens (rank 16 ≥ 9), the message built
by the federated code (Wanda scores, negotiation, selective CKKS encryption, fedwire) and decoded
as the server does. Measured on the tiny model (recall of the distinct tokens / precision):

==============  =========  ==========  ==========  ==========
variant          clear      0.125 %     1 %         10 %
==============  =========  ==========  ==========  ==========
DAGER, q only    1.00/1.00  0.11/1.00   0.11/1.00   0.00/-
DAGER, q|k|v     1.00/1.00  0.11/1.00   0.11/1.00   0.00/-
position-aware   1.00/1.00  1.00/1.00   1.00/1.00   1.00/1.00
==============  =========  ==========  ==========  ==========

(``d_in = 64``: 0.125 % and 1 % both hide one column per layer, 10 % seven.)

- DAGER as published (full candidates against the masked update): SHE-LoRA defeats it at every
  budget, on one ``A`` or on q|k|v stacked. Stacking can undo a small budget, though: each layer
  has its own list, so q, k and v may hide *different* columns, and the union of their masked
  row spaces brings the hidden coordinates back (``test_stacking_qkv_can_undo_a_small_budget``,
  with another owner's calibration data: recall 1.00 at 0.125 %).
- Position-aware (the server knows the positions from the negotiation and drops them): the
  hiding does not protect the token set at all, at any budget: ``d_in − |S|`` coordinates still
  single out the batch's tokens among the 256 candidates.

These are assertions, not just prints: if the protection or the leak changes, the test fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hecommon.errors import ConfigError
from hecommon.model import tiny_llama
from helora_orchestrator.client_model import build_client
from helora_orchestrator.data import ByteTokenizer, Example, pack
from helora_orchestrator.federated.dager import (
    DEFAULT_THRESHOLD,
    FIRST_BLOCK_QKV,
    ObservedA,
    attack_message,
    attack_sum_message,
    chance_acceptance,
    dager_attack,
    first_layer_inputs,
    observed_from_sum,
    one_step_contribution,
    one_step_sum,
    recovery_scores,
    row_space,
    span_distances,
    warm_start,
)
from helora_orchestrator.federated.selective import CkksKeys
from helora_orchestrator.lora import LoraSettings

BUDGETS = (0.00125, 0.01, 0.1)
VARIANTS = {  # name → (layers, position_aware)
    "dager_q": (FIRST_BLOCK_QKV[:1], False),
    "dager_qkv": (FIRST_BLOCK_QKV, False),
    "position_aware": (FIRST_BLOCK_QKV, True),
}
SECRET = "hello world, hello"  # 9 distinct bytes; the last one also occurs earlier


def _owner_data(template: str):
    rows = [Example(key=str(i), completion=template.format(i=i, j=i + 1, k=i + 2)) for i in range(40)]
    return pack(rows, ByteTokenizer(), seq_len=32)


@pytest.fixture(scope="module")
def owner_data():
    return _owner_data("The number {i} is followed by {j}, and then by {k}.")


def _candidates(model) -> np.ndarray:
    return first_layer_inputs(model.model.embed_tokens.weight.detach().numpy(),
                              model.model.layers[0].input_layernorm.weight.detach().numpy(),
                              model.config.rms_norm_eps)


@pytest.fixture(scope="module")
def recovery(fed_keys: CkksKeys, owner_data) -> dict[float, dict[str, dict[str, float]]]:
    """budget → variant → scores; the same owner state and batch for every budget."""
    batch = torch.tensor([ByteTokenizer().encode(SECRET)])
    out: dict[float, dict[str, dict[str, float]]] = {}
    for budget in (0.0, *BUDGETS):
        model, _ = tiny_llama(seed=0)
        candidates = _candidates(model)
        client = build_client(model, "clear", LoraSettings(r=16), seed=1)
        warm_start(client, owner_data)
        view = one_step_contribution(client, batch, owner_data, budget, fed_keys)
        out[budget] = {name: attack_message(view, candidates, layers, aware)
                       for name, (layers, aware) in VARIANTS.items()}
    for budget, row in out.items():  # the measured rates, in the test log
        print(f"budget {budget:>7}: " + "  ".join(f"{n} {s['recall']:.2f}/{s['precision']:.2f}" for n, s in row.items()))
    return out


def test_clear_update_betrays_the_batch(recovery):
    for name, s in recovery[0.0].items():
        assert s["recall"] >= 0.9, (name, s)
        assert s["precision"] == 1.0, (name, s)
        assert s["hidden"] == 0


@pytest.mark.parametrize("variant", ["dager_q", "dager_qkv"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_selective_encryption_defeats_published_dager(recovery, budget, variant):
    """DAGER with full candidates: far below the clear rate at every budget."""
    clear, she = recovery[0.0][variant], recovery[budget][variant]
    assert she["hidden"] >= 1
    assert she["recall"] <= 0.2 * clear["recall"], (budget, variant, she)


def test_stacking_qkv_can_undo_a_small_budget(fed_keys: CkksKeys):
    """Documented leak: each layer has its own list; with this owner's calibration data q, k and v
    hide *different* single columns at 0.125 %, and DAGER on the three stacked updates (whose
    row space then holds the hidden coordinates again) recovers every token, while DAGER on q
    alone does not."""
    data = _owner_data("The number {i} is followed by {j}.")
    model, _ = tiny_llama(seed=0)
    candidates = _candidates(model)
    client = build_client(model, "clear", LoraSettings(r=16), seed=1)
    warm_start(client, data)
    view = one_step_contribution(client, torch.tensor([ByteTokenizer().encode(SECRET)]), data, 0.00125, fed_keys)
    stacked = attack_message(view, candidates, FIRST_BLOCK_QKV)
    single = attack_message(view, candidates, FIRST_BLOCK_QKV[:1])
    assert stacked["hidden"] > 1  # the three layers hide different columns
    assert stacked["recall"] >= 0.9 and stacked["precision"] == 1.0, stacked
    assert single["recall"] <= 0.2, single


def test_one_adam_step_is_outside_the_span_check(fed_keys: CkksKeys, owner_data):
    """The attack's setting is FedSGD: an Adam step from fresh moments (as after ``Owner.merge``)
    moves each entry by about ``lr·sign(g)``, whose rows leave the inputs' span, and the check
    recovers nothing even from a clear update. Not a proof of safety: another attack might."""
    model, _ = tiny_llama(seed=0)
    candidates = _candidates(model)
    client = build_client(model, "clear", LoraSettings(r=16), seed=1)
    warm_start(client, owner_data)
    view = one_step_contribution(client, torch.tensor([ByteTokenizer().encode(SECRET)]), owner_data, 0.0,
                                 fed_keys, lr=1e-3, optimizer="adam")
    for layers in (FIRST_BLOCK_QKV[:1], FIRST_BLOCK_QKV):
        s = attack_message(view, candidates, layers)
        assert s["recall"] == 0.0 and s["hidden"] == 0, s


@pytest.mark.parametrize("budget", BUDGETS)
def test_position_aware_server_still_recovers_the_tokens(recovery, budget):
    """Documented limit of column hiding: the server knows the positions and drops them."""
    s = recovery[budget]["position_aware"]
    assert s["dims"] < 64
    assert s["recall"] >= 0.9 and s["precision"] == 1.0, (budget, s)


def test_span_check_on_known_inputs_and_its_rank_limit():
    """Exact math on synthetic inputs: recovered iff T ≤ rank, nothing else in the vocabulary."""
    rng = np.random.default_rng(0)
    candidates = rng.standard_normal((500, 48))
    for tokens, expect in ((rng.choice(500, 6, replace=False), 1.0), (rng.choice(500, 20, replace=False), 0.0)):
        grads = rng.standard_normal((8, len(tokens)))  # Bᵀ·Gᵀ, rank min(8, T)
        obs = [ObservedA("q", grads @ candidates[tokens], np.array([], dtype=np.int64))]
        res = dager_attack(obs, candidates)
        s = recovery_scores(res.tokens, tokens)
        assert s["recall"] == expect and s["false_positives"] == 0, (len(tokens), s)
        assert res.rank == min(8, len(tokens))


def test_a_row_space_that_leaves_a_dimension_or_two_out_singles_out_nothing():
    """Noise of rank d − 1 or d − 2 (a ciphertext read as numbers whose smallest singular values fall
    under ``rank_rtol`` by chance: seen once in 576 dimensions) passes a random share of the
    vocabulary through the span check (6 % at d − 1 here): the attack abstains rather than
    "recover" tokens at chance. A span with enough dimensions left out still finds every token."""
    rng = np.random.default_rng(3)
    candidates = rng.standard_normal((2000, 64))
    for rank in (63, 62):
        noise = rng.standard_normal((rank, 64))
        res = dager_attack([ObservedA("q", noise, np.array([], dtype=np.int64))], candidates)
        assert res.rank == rank and len(res.tokens) == 0, (rank, len(res.tokens))
        if rank == 63:  # what the check alone would have passed
            assert (span_distances(candidates, row_space([noise])) < DEFAULT_THRESHOLD).mean() > 0.03
    tokens = rng.choice(2000, 40, replace=False)
    obs = [ObservedA("q", rng.standard_normal((40, 40)) @ candidates[tokens], np.array([], dtype=np.int64))]
    res = dager_attack(obs, candidates)
    assert set(res.tokens.tolist()) == set(tokens.tolist()) and res.rank == 40
    assert chance_acceptance(576, 575, 1e-2) > 0.1 and chance_acceptance(576, 40, 1e-2) < 1e-100


def test_hidden_coordinates_raise_the_naive_distance_by_their_share():
    """Naive check: a true token's distance is at least ``‖x[S]‖ / ‖x‖`` when ``S`` is zeroed."""
    rng = np.random.default_rng(1)
    candidates = rng.standard_normal((200, 32))
    tokens = np.array([3, 17, 42])
    update = rng.standard_normal((8, 3)) @ candidates[tokens]
    hidden = np.array([5, 9])
    masked = update.copy()
    masked[:, hidden] = 0
    res = dager_attack([ObservedA("q", masked, hidden)], candidates)
    share = np.linalg.norm(candidates[tokens][:, hidden], axis=1) / np.linalg.norm(candidates[tokens], axis=1)
    assert np.all(res.distances[tokens] >= share - 1e-12)
    aware = dager_attack([ObservedA("q", masked, hidden)], candidates, position_aware=True)
    assert set(aware.tokens.tolist()) == set(tokens.tolist())


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="hidden columns"):
        ObservedA("q", np.zeros((2, 4)), np.array([4]))
    with pytest.raises(ConfigError, match="d_in"):
        dager_attack([ObservedA("q", np.ones((2, 4)), np.array([], dtype=np.int64))], np.ones((3, 5)))
    with pytest.raises(ConfigError, match="no observed"):
        dager_attack([], np.ones((3, 5)))
    with pytest.raises(ConfigError, match="optimizer"):
        model, _ = tiny_llama(seed=0)
        client = build_client(model, "clear", LoraSettings(r=4), seed=1)
        one_step_contribution(client, torch.tensor([[1, 2, 3]]), _owner_data("{i}{j}{k}"), 0.0, None, optimizer="lion")
    with pytest.raises(ConfigError, match="no starting A"):
        dager_attack([ObservedA("q", np.ones((2, 4)), np.array([0]))], np.ones((3, 4)), a_start={})
    with pytest.raises(ConfigError, match="start A"):
        ObservedA("q", np.ones((2, 4)), np.array([0])).update(np.ones((3, 4)))
    assert row_space([np.zeros((2, 4))]).shape == (0, 4)


def test_full_encryption_leaves_the_attack_nothing(fed_keys: CkksKeys, owner_data):
    """``--scheme full``, the same owner state, batch and SGD step: every variant recovers every
    token from the update in the clear (FlexLoRA's ``s·B·A``, the server knowing the round's start)
    and none from the encrypted one. Read without the key, the update has full rank, so the span
    check singles out nothing (the attack abstains); an attacker who keeps only the strongest
    ``3r`` directions of it, as if it were a low-rank update, finds no token inside either."""
    model, _ = tiny_llama(seed=0)
    candidates = _candidates(model)
    client = build_client(model, "clear", LoraSettings(r=16), seed=1)
    warm_start(client, owner_data)
    view = one_step_sum(client, torch.tensor([ByteTokenizer().encode(SECRET)]), fed_keys)
    for name, (layers, _aware) in VARIANTS.items():
        clear = attack_sum_message(view, candidates, layers, clear=True)
        assert clear["recall"] >= 0.9 and clear["precision"] == 1.0, (name, clear)
        enc = attack_sum_message(view, candidates, layers)
        assert enc["recall"] == 0.0 and enc["recovered"] == 0.0, (name, enc)
        assert enc["rank"] == enc["dims"] == candidates.shape[1]  # noise in every direction
    observed = observed_from_sum(view.message)
    top = row_space([o.a for o in observed])[: 3 * 16]
    assert not (span_distances(candidates, top) < 1e-2).any()
