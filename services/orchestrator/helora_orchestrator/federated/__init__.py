"""Federated mode: SHE-LoRA (Liu et al., arXiv 2505.21051; DESIGN §5), the data owners' side.

API NOTE (agreed with C2, who writes the DAGER attack and ``benchmarks/federated.py``)
======================================================================================

Layers are named by their module path in the HF model, e.g. ``"model.layers.0.self_attn.q_proj"``.
``ΔW_i = s_i·B_i·A_i`` is ``(d_out, d_in)``; ``A_i`` is ``(r_i, d_in)``, ``B_i`` ``(d_out, r_i)``,
``s_i = alpha_i / r_i``. A *column* ``j`` of ``A_i`` is an input dimension (comparable across ranks).

Budgets (``client.OwnerConfig.budget``): the fraction of each layer's ``d_in`` columns of ``A``
that the owner encrypts: ``k_i = ceil(budget·d_in)`` (0 → nothing encrypted, clear FlexLoRA;
1.0 → every column, the full-HE baseline), capped by the negotiated list's length.
E.g. 0.00125, 0.01, 0.1 (the paper's 0.125 %, 1 %, 10 %).

Owner side (``helora_orchestrator.federated``)::

    selective.CkksKeys.generate() -> CkksKeys          # shared key, one owner makes it (keygen)
    CkksKeys.save(path) / CkksKeys.load(path)           # 0600 file, holds the secret key
    CkksKeys.public_bytes() -> bytes                    # TenSEAL context, save_secret_key=False
    client.OwnerConfig(name, rank, budget, alpha=None (2·rank), local_steps=2, lr=1e-3,
                       batch_size=4, seq_len=32, mode="clear", seed=0, optimizer="adamw"|"sgd",
                       targets=BLOCK_LINEARS)
    client.Owner(cfg, model, train_data, eval_data, keys)   # model: a fresh HF causal LM
        .client (ClientModel)  .trainer (train.Trainer)     # the usual objects, for the attack
        .train_local() -> float                              # cfg.local_steps Trainer steps
        .proposal(plan_request) -> fedwire.Proposal          # top-k_i positions per layer
        .contribute(plan: fedwire.RoundPlan) -> fedwire.Contribution
        .merge(aggregate: fedwire.Aggregate) -> None         # decrypt + SVD to own rank
        .eval_loss() -> float                                # held-out loss, own eval data
        .adapter() -> dict[layer, (A (r,d_in), B (d_out,r))] # torch tensors
    round.run_federation(owners: list[OwnerConfig], rounds=2, model="tiny",
                         data=None, seed=0, aggregator=None) -> list[RoundReport]
        # embedded: an in-process helora_aggregator.federated.FederatedAggregator
    round.RoundReport(round, eval_loss: dict[owner, float], mean_eval_loss, bytes_up: dict[owner,int],
                      bytes_down, enc_seconds: dict[owner, float], rejected: dict[owner, str])
    round.run_round(owners: list[Owner], aggregator, round_no) -> RoundReport   # one round, given objects

Server side (``helora_aggregator.federated``, pure, no broker)::

    FederatedAggregator(public_context: bytes)   # refuses a context with a secret key
        .plan(proposals: list[Proposal], layers: dict[layer,(d_out,d_in)], round_id) -> RoundPlan
        .aggregate(plan, contributions: list[bytes]) -> (Aggregate, rejected: dict[owner, str])
    clear_update(c: Contribution) -> dict[layer, np.ndarray (d_out, d_in)]
        # EXACTLY what the server can compute in the clear from one owner's message:
        # s_i·B_i·A_i with the encrypted columns zero, in the original column order
        # (the DAGER attack's input). ``fedwire.decode_contribution(bytes)`` gives ``c``.

Wire (``hecommon.fedwire``): ``Contribution`` / ``encode_contribution`` / ``decode_contribution``,
``Proposal``, ``RoundPlan``, ``Aggregate`` (same discipline as ``wire.py``). Per owner the server
receives: owner name, sample count, context digest, and per layer ``B_eff = s_i·B_i``
(float32), ``A`` with the chosen columns swapped to the end and zeroed (float32), ``k_i``, and
the CKKS ciphertexts of ``w_i·s_i·B_i·a_ij`` for the chosen columns (flat, in global-list order).
"""
