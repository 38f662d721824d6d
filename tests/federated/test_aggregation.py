"""SHE-LoRA aggregation equals the clear computation of the same algorithm (FlexLoRA's weighted ΔW
average), at any budget, across heterogeneous ranks, over several rounds (tiny model, embedded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hecommon.wire.fedfields import global_order
from helora_aggregator.federated import FederatedAggregator, clear_update
from helora_orchestrator.federated import fullhe
from helora_orchestrator.federated.reparam import svd_to_rank
from helora_orchestrator.federated.round import run_round

from .conftest import CKKS_ATOL


def torch_flexlora(owners) -> dict[str, np.ndarray]:
    """The reference: Σ_i w_i·s_i·B_i·A_i / Σ_i w_i from each owner's own parameters, in torch."""
    total = sum(o.samples for o in owners)
    out = {}
    for name in owners[0].shapes():
        acc = 0
        for o in owners:
            a, b = o.adapter()[name]
            acc = acc + o.samples * o.client.lora_settings.scaling * (b.double() @ a.double())
        out[name] = (acc / total).numpy()
    return out


def _round_against_reference(owners, aggregator, r):
    for o in owners:
        o.train_local()
    want = torch_flexlora(owners)
    report = run_round(owners, aggregator, r, train=False)
    assert not report.rejected
    return want, report


@pytest.mark.parametrize("budgets", [(0.02, 0.05, 0.2), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)],
                         ids=["she", "budget0", "all-encrypted"])
def test_heterogeneous_ranks_match_clear_flexlora(make_owners, fed_keys, budgets):
    owners = make_owners((4, 8, 16), budgets)
    aggregator = FederatedAggregator(fed_keys.public_bytes())
    for r in range(1, 4 if budgets == (0.02, 0.05, 0.2) else 3):
        want, report = _round_against_reference(owners, aggregator, r)
        agg = report.aggregate
        for o in owners:
            for name, dw in o.last_merged.items():
                scale = np.abs(want[name]).max()
                assert scale > 1e-4  # a real update, not zeros on both sides
                tol = 1e-7 * scale if max(budgets) == 0 else CKKS_ATOL  # float32 clear part only
                np.testing.assert_allclose(dw, want[name], rtol=0, atol=tol)
                # and the owner now holds the best rank-r_i approximation of that ΔW
                a, b = o.adapter()[name]
                s = o.client.lora_settings.scaling
                a_ref, b_ref = svd_to_rank(want[name], a.shape[0], s)
                np.testing.assert_allclose(s * (b.double() @ a.double()).numpy(), s * b_ref @ a_ref,
                                           rtol=0, atol=1e-4 * scale)
        for lay in agg.layers:
            k_max = max(min(int(np.ceil(b * lay.d_in - 1e-9)), lay.d_in) for b in budgets)
            assert sum(1 for c in lay.counts if c > 0) == k_max
            if max(budgets) == 0:
                assert lay.enc == () and lay.counts == ()
            if min(budgets) == 1.0:
                assert not lay.clear.any()  # nothing of the update in the clear


def test_counts_are_the_weights_of_the_owners_that_encrypted_each_position(make_owners, fed_keys):
    owners = make_owners((4, 8, 16), (0.02, 0.05, 0.2))
    report = run_round(owners, FederatedAggregator(fed_keys.public_bytes()), 1)
    w = [o.samples for o in owners]
    for lay in report.aggregate.layers:
        ks = [min(int(np.ceil(b * lay.d_in - 1e-9)), len(lay.order)) for b in (0.02, 0.05, 0.2)]
        expect = [sum(wi for wi, k in zip(w, ks, strict=True) if k > t) for t in range(len(lay.order))]
        assert list(lay.counts) == expect
        assert report.aggregate.total == sum(w)


def test_all_encrypted_equals_full_he_baseline(make_owners, fed_keys):
    owners = make_owners((4, 8, 16), (1.0, 1.0, 1.0))
    for o in owners:
        o.train_local()
    deltas = [o.delta() for o in owners]
    total = sum(o.samples for o in owners)
    cts = [fullhe.encrypt_full(fed_keys, d, o.samples)[0] for d, o in zip(deltas, owners, strict=True)]
    baseline = fullhe.decrypt_full(fed_keys, fullhe.sum_full(fed_keys.public_bytes(), cts), owners[0].shapes(), total)
    report = run_round(owners, FederatedAggregator(fed_keys.public_bytes()), 1, train=False)
    for name, dw in owners[0].last_merged.items():
        np.testing.assert_allclose(dw, baseline[name], rtol=0, atol=CKKS_ATOL)
    # with every column encrypted, the server computes nothing of the update in the clear
    for data in report.received:
        from hecommon.wire.federated import decode_contribution

        assert all(not u.any() for u in clear_update(decode_contribution(data, 1 << 30), report.plan).values())


def test_clear_update_is_the_owners_update_with_encrypted_columns_zeroed(make_owners, fed_keys):
    from hecommon.wire.federated import decode_contribution

    owners = make_owners((4, 8, 16), (0.02, 0.05, 0.2))
    for o in owners:
        o.train_local()
    deltas = {o.name: o.delta() for o in owners}
    report = run_round(owners, FederatedAggregator(fed_keys.public_bytes()), 1, train=False)
    for data in report.received:
        c = decode_contribution(data, 1 << 30)
        seen = clear_update(c, report.plan)
        for lay in c.layers:
            hidden = list(report.plan.layer(lay.name).order[:lay.k])
            assert lay.k >= 1
            want = deltas[c.owner][lay.name].copy()
            want[:, hidden] = 0.0
            np.testing.assert_allclose(seen[lay.name], want, rtol=0, atol=1e-6 * np.abs(want).max())
            assert not seen[lay.name][:, hidden].any()


def test_merged_adapter_exports_in_peft_format(make_owners, fed_keys, tmp_path):
    from helora_orchestrator.export import export_peft, load_peft_adapter

    owners = make_owners((4, 8), (0.05, 0.1))
    run_round(owners, FederatedAggregator(fed_keys.public_bytes()), 1)
    out = export_peft(owners[1].client, tmp_path / "adapter")
    settings, weights, _ = load_peft_adapter(out)
    assert settings.r == 8
    for name, (a, b) in owners[1].adapter().items():
        assert torch.equal(weights[f"{name}.lora_A.weight"], a)
        assert torch.equal(weights[f"{name}.lora_B.weight"], b)


@pytest.mark.parametrize("d_out,d_in", [(576, 576), (1536, 576), (576, 1536), (192, 576)])
def test_smollm2_dimensions_aggregate_within_tolerance(fed_keys, d_out, d_in):
    """SmolLM2-135M's layer shapes (hidden 576, MLP 1536, k/v 192), synthetic adapters, no model:
    the flat packing spans ciphertexts (d_out·k values over 2048-slot vectors) and still lines up."""
    from hecommon.wire import federated as fedwire
    from hecommon.wire import fedfields
    from helora_orchestrator.federated.negotiate import budget_columns, top_k
    from helora_orchestrator.federated.reparam import reconstruct
    from helora_orchestrator.federated.selective import select_and_encrypt

    rng = np.random.default_rng(d_out * 7 + d_in)
    name, rid = "model.layers.0.mlp.x_proj", bytes(16)
    owners = [(4, 0.01, 30), (8, 0.1, 50), (16, 0.00125, 20)]  # (rank, budget, samples)
    facs = [(rng.standard_normal((r, d_in)) * 0.05, rng.standard_normal((d_out, r)) * 0.01) for r, _, _ in owners]
    scores = [np.abs(a).sum(0) * rng.random(d_in) for a, _ in facs]
    order = global_order([top_k(s, budget_columns(b, d_in)) for s, (_, b, _) in zip(scores, owners, strict=True)])
    plan = fedwire.RoundPlan(rid, fed_keys.digest, (fedwire.PlanLayer(name, d_out, d_in, order),))
    contribs = []
    for i, ((r, b, w), (a, bb)) in enumerate(zip(owners, facs, strict=True)):
        k = min(budget_columns(b, d_in), len(order))
        b_eff = (2.0 * bb).astype(np.float32)  # scaling 2
        swapped, enc = select_and_encrypt(fed_keys, a.astype(np.float32), b_eff, order, k, w)
        lay = fedwire.LayerContribution(name, d_out, d_in, r, k, b_eff, swapped, enc)
        contribs.append(fedwire.encode(fedwire.Contribution(rid, f"o{i}", w, fed_keys.digest, (lay,)), 1 << 30))
    agg, rejected = FederatedAggregator(fed_keys.public_bytes()).aggregate(plan, contribs)
    assert not rejected
    got = reconstruct(agg.layer(name), agg.total, fed_keys)
    want = sum(w * 2.0 * bb.astype(np.float32).astype(np.float64) @ a.astype(np.float32).astype(np.float64)
               for (_, _, w), (a, bb) in zip(owners, facs, strict=True)) / 100
    np.testing.assert_allclose(got, want, rtol=0, atol=CKKS_ATOL)
    assert len(agg.layer(name).enc) == -(-len(order) * d_out // fedfields.CKKS_SLOTS)



def test_owners_train_locally_in_any_mode(fed_data, fed_keys):
    """One owner trains through the encrypted split protocol (embedded server), one quantized, one
    clear: the federation only sees their adapters, and the aggregate is the same average."""
    from helora_orchestrator.federated.client import OwnerConfig
    from helora_orchestrator.federated.round import build_owners

    configs = [OwnerConfig("enc", rank=4, budget=0.05, mode="encrypted", local_steps=1, seed=1, scheme="selective"),
               OwnerConfig("quant", rank=8, budget=0.02, mode="quantized", local_steps=1, seed=2, scheme="selective"),
               OwnerConfig("clear", rank=16, budget=0.1, mode="clear", local_steps=1, seed=3, scheme="selective")]
    owners, _ = build_owners(configs, "tiny", fed_data, keys=fed_keys)
    assert owners[0].client.wire_bytes == 0
    want, report = _round_against_reference(owners, FederatedAggregator(fed_keys.public_bytes()), 1)
    assert owners[0].client.wire_bytes > 0  # its local step went through the encrypted server
    for o in owners:
        for name, dw in o.last_merged.items():
            np.testing.assert_allclose(dw, want[name], rtol=0, atol=CKKS_ATOL)


def test_three_rounds_follow_the_clear_flexlora_trajectory(make_owners, fed_keys):
    """End to end, same seeds and data: 3 rounds with SHE-LoRA budgets, with every column under CKKS,
    and with every coordinate under helora's RLWE (``--scheme full``) reach the held-out losses of
    clear FlexLoRA (budget 0). The adapters differ by the
    CKKS noise (~1e-8), or the fixed point's step (~1e-8 here), amplified by AdamW where a gradient
    entry is near zero (its first step is about lr·sign(g)), so they are compared loosely (5 % of
    the largest entry) for CKKS and not at all for the fixed point, whose amplified differences
    reached 6.5 % and 13 % of one layer's largest entry in two runs (each round's merged ΔW is held
    to the fixed-point step in test_full_scheme.py); the losses agree to 1e-5, and to 1e-4 for the
    fixed point (issue 20's bound; 2.2e-5 measured with the default update range of 1024)."""

    def run(budgets, scheme="selective"):
        owners = make_owners((4, 8, 16), budgets, scheme=scheme)
        aggregator = FederatedAggregator(fed_keys.public_bytes())
        for r in range(1, 4):
            report = run_round(owners, aggregator, r)
        return report, [o.delta() for o in owners]

    clear, clear_deltas = run((0.0, 0.0, 0.0))
    for budgets, scheme in (((0.02, 0.05, 0.2), "selective"), ((1.0, 1.0, 1.0), "selective"),
                            ((0.0, 0.0, 0.0), "full")):
        report, deltas = run(budgets, scheme)
        for name, loss in clear.eval_loss.items():
            assert abs(report.eval_loss[name] - loss) < (1e-4 if scheme == "full" else 1e-5)
        for d, c in zip(deltas, clear_deltas, strict=True):
            for name in c:
                assert scheme == "full" or np.abs(d[name] - c[name]).max() <= 0.05 * np.abs(c[name]).max()
