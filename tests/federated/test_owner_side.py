"""Owner-side pieces: Wanda-style scores, top-k and the global list, the swap layout, SVD to rank, key file."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from hecommon.errors import ConfigError
from hecommon.wire.fedfields import global_order, swap_layout, unswap
from helora_orchestrator.federated.negotiate import budget_columns, top_k
from helora_orchestrator.federated.reparam import svd_to_rank
from helora_orchestrator.federated.selective import CkksKeys, select_and_encrypt
from helora_orchestrator.federated.sensitivity import column_scores, lora_layers


def test_scores_are_input_norm_times_column_l1_of_A(make_owners):
    owner = make_owners((4,), (0.05,), calibration_batches=1, batch_size=2)[0]
    name, layer = next(iter(lora_layers(owner.client).items()))
    captured = []
    h = layer.register_forward_hook(lambda m, args, out: captured.append(args[0].detach().clone()))
    scores = column_scores(owner.client, owner.trainer.train_data, batches=1, batch_size=2)
    h.remove()
    x = captured[0].reshape(-1, layer.in_features).double()  # (tokens, d_in): the LoRA input
    want = x.norm(dim=0) * layer.lora_A.weight.detach().double().abs().sum(dim=0)
    np.testing.assert_allclose(scores[name], want.numpy(), rtol=1e-12)
    assert set(scores) == set(owner.shapes())


def test_budget_top_k_and_global_order():
    assert [budget_columns(b, 64) for b in (0.0, 0.00125, 0.01, 0.1, 1.0)] == [0, 1, 1, 7, 64]
    assert budget_columns(0.01, 576) == 6
    with pytest.raises(ConfigError):
        budget_columns(1.5, 64)
    assert top_k(np.array([0.1, 3.0, 2.0, 3.0]), 3) == (1, 3, 2)
    # Borda over lists of the longest length K = 3: 5 scores 3+3, 2 scores 1+2 (two votes), 7 scores 3
    # (one vote), 1 scores 2: 2 beats 7 on votes, and the list keeps K = 3 positions
    assert global_order([(5, 1, 2), (5, 2), (7,)]) == (5, 2, 7)
    assert global_order([]) == ()


def test_swap_layout_right_aligns_the_chosen_columns(fed_keys):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 8)).astype(np.float32)
    b = rng.standard_normal((5, 3)).astype(np.float32)
    order = (6, 1, 4)
    swapped, enc = select_and_encrypt(fed_keys, a, b, order, 2, weight=3)
    assert list(swap_layout(8, order, 2)) == [0, 2, 3, 4, 5, 7, 1, 6]
    assert not swapped[:, -2:].any()
    np.testing.assert_array_equal(unswap(swapped, order, 2)[:, [0, 2, 3, 4, 5, 7]], a[:, [0, 2, 3, 4, 5, 7]])
    dec = fed_keys.decrypt_flat(enc, 2 * 5).reshape(2, 5)
    np.testing.assert_allclose(dec, 3 * (b.astype(np.float64) @ a[:, [6, 1]].astype(np.float64)).T, atol=1e-6)


def test_svd_to_rank_is_the_best_rank_r_approximation():
    rng = np.random.default_rng(1)
    dw = rng.standard_normal((12, 10))
    a, b = svd_to_rank(dw, 4, scaling=2.0)
    u, s, vt = np.linalg.svd(dw)
    np.testing.assert_allclose(2.0 * b @ a, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-12)
    np.testing.assert_allclose(a @ a.T, np.eye(4), atol=1e-12)  # A keeps unit rows: every direction trains
    a16, b16 = svd_to_rank(dw, 16, scaling=1.0)  # rank above min(d_out, d_in): padded with zeros
    np.testing.assert_allclose(b16 @ a16, dw, atol=1e-12)


def test_key_file_is_0600_and_loads(tmp_path):
    keys = CkksKeys.generate()
    path = keys.save(tmp_path / "fed.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = CkksKeys.load(path)
    assert again.digest != b"" and again.secret_key_bytes() == keys.secret_key_bytes()
    with pytest.raises(FileExistsError):
        keys.save(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        CkksKeys.load(path)
    (tmp_path / "junk").write_bytes(b"junk")
    os.chmod(tmp_path / "junk", 0o600)
    with pytest.raises(ConfigError, match="not a TenSEAL context"):
        CkksKeys.load(tmp_path / "junk")


def test_merge_resets_optimizer_moments_and_training_continues(make_owners, fed_keys):
    from helora_aggregator.federated import FederatedAggregator
    from helora_orchestrator.federated.round import run_round

    owners = make_owners((4, 8), (0.05, 0.05))
    run_round(owners, FederatedAggregator(fed_keys.public_bytes()), 1)
    assert not owners[0].trainer.optimizer.state
    before = {n: a.clone() for n, (a, _) in owners[0].adapter().items()}
    owners[0].train_local()
    assert any(not torch.equal(before[n], a) for n, (a, _) in owners[0].adapter().items())


def test_sgd_owner_takes_plain_gradient_steps(make_owners):
    owner = make_owners((4,), (0.05,), optimizer="sgd", local_steps=1, lr=0.5)[0]
    assert isinstance(owner.trainer.optimizer, torch.optim.SGD)
    name, layer = next(iter(lora_layers(owner.client).items()))
    assert not layer.lora_B.weight.any()
    owner.train_local()
    assert layer.lora_B.weight.any()  # B moved off zero by -lr·grad (clipped), nothing else


def test_owner_refuses_a_plan_or_aggregate_that_does_not_match_its_layers(make_owners, fed_keys):
    """A plan or an aggregate with a layer missing, an extra one, or another (d_out, d_in) is a
    ParameterMismatch naming the layer (it used to be a KeyError or a numpy/torch error)."""
    import dataclasses

    from hecommon.errors import ParameterMismatch
    from hecommon.wire import federated as fedwire
    from helora_aggregator.federated import FederatedAggregator

    owner = make_owners((4,), (0.05,))[0]
    shapes = owner.shapes()
    first = next(iter(shapes))
    aggregator = FederatedAggregator(fed_keys.public_bytes())
    rid = bytes(fedwire.RID_BYTES)
    plan, _ = aggregator.plan([owner.proposal(rid)], shapes, rid)
    missing = dataclasses.replace(plan, layers=plan.layers[1:])
    with pytest.raises(ParameterMismatch, match=f"missing.*{first}"):
        owner.contribute(missing)
    d_out, d_in = shapes[first]
    wider = fedwire.PlanLayer(first, d_out, d_in + 4, plan.layers[0].order)
    with pytest.raises(ParameterMismatch, match=f"{first}: .*\\({d_out}, {d_in + 4}\\).*\\({d_out}, {d_in}\\)"):
        owner.contribute(dataclasses.replace(plan, layers=(wider, *plan.layers[1:])))
    extra = fedwire.PlanLayer("model.layers.99.mlp.up_proj", 8, 8, ())
    with pytest.raises(ParameterMismatch, match="unexpected.*layers.99"):
        owner.contribute(dataclasses.replace(plan, layers=(*plan.layers, extra)))

    agg, _ = aggregator.aggregate(plan, [owner.contribute(plan)])
    with pytest.raises(ParameterMismatch, match=f"missing.*{first}"):
        owner.merge(dataclasses.replace(agg, layers=agg.layers[1:]))
    lay = agg.layers[0]
    taller = fedwire.LayerAggregate(first, d_out + 2, d_in, np.zeros((d_out + 2, d_in), np.float32), lay.order,
                                    (0,) * len(lay.order), ())
    with pytest.raises(ParameterMismatch, match=f"{first}: "):
        owner.merge(dataclasses.replace(agg, layers=(taller, *agg.layers[1:])))
    owner.merge(agg)  # the real one still merges
