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
        .delta() -> dict[layer, np.ndarray (d_out,d_in)]     # s·B·A now (float64)
        .factors() -> dict[layer, (A, s·B)]                  # float64 numpy; what contribute_sum encodes
        .samples (int, the weight w_i)  .last_merged (layer → aggregated ΔW after merge)
    round.build_owners(configs, model="tiny", data=None (path; bundled corpus), seed=0, keys=None)
        -> (list[Owner], CkksKeys)      # example i goes to owner i mod N; same base weights
    round.run_federation(configs: list[OwnerConfig], rounds=2, model="tiny",
                         data=None, seed=0, keys=None, on_round=None) -> list[RoundReport]
        # embedded: the aggregator in-process (``helora_orchestrator.embedded.federated_aggregator``)
    round.run_round(owners, aggregator: round.Aggregator, round_no, rid=None, tamper=None, train=True) -> RoundReport
        # train=False: the caller already ran owner.train_local() (e.g. one SGD step for DAGER)
    report.RoundReport: round, train_loss, eval_loss: dict[owner, float], mean_eval_loss,
        bytes_up: dict[owner, int], bytes_down (per owner), enc_seconds: dict[owner, float],
        rejected: dict[owner, str], plan (RoundPlan), received (list[bytes]: the contributions
        exactly as the server received them), aggregate (Aggregate)
    fullhe.encrypt_full(keys, owner.delta(), owner.samples) -> (layer → ciphertexts, seconds)
    fullhe.sum_full(public_bytes, [per-owner dicts]) ; fullhe.decrypt_full(keys, summed, shapes, total)
        # the full-HE baseline (every value of every ΔW_i encrypted)
    tests/federated/conftest.py: fixtures ``fed_keys`` (session CkksKeys), ``fed_data`` (jsonl),
        ``make_owners(ranks=(4,8,16), budgets=(...), **OwnerConfig fields)`` -> list[Owner]

Over RabbitMQ (``broker.py``; the server is ``helora_aggregator.fedworker``)::

    FederatedBrokerClient(url, namespace, timeout_s) .handshake(keys) .call(msg, expect) .close()
    owner_round(owner, client, round_no, train=True) -> RoundReport
    round_id(digest, round_no) -> bytes   # the owners agree on it without talking

Modules here: sensitivity, negotiate, selective (CKKS), reparam (SVD), client (Owner), round
(embedded driver), report (``RoundReport``), fullhe (baseline), broker, cli (``helora federate``);
dager.py is C2's (its honest server is the in-process aggregator).

Server side (``helora_aggregator.federated``, pure, no broker)::

    FederatedAggregator(public_context: bytes)   # refuses a context with a secret key
        .plan(proposals: list[Proposal], layers: dict[layer,(d_out,d_in)], rid) -> (RoundPlan, rejected)
        .aggregate(plan, contributions: list[bytes | Contribution]) -> (Aggregate, rejected: dict[owner, str])
    clear_update(c: Contribution, plan: RoundPlan) -> dict[layer, np.ndarray (d_out, d_in)]
        # EXACTLY what the server can compute in the clear from one owner's message:
        # s_i·B_i·A_i with the encrypted columns zero, in the original column order
        # (the DAGER attack's input). ``fedwire.decode_contribution(bytes)`` gives ``c``.

Wire (``hecommon.wire.federated``): ``Contribution`` / ``encode_contribution`` / ``decode_contribution(b, max_bytes)``,
``Proposal``, ``RoundPlan``, ``Aggregate`` (same discipline as ``wire.py``). Per owner the server
receives: owner name, sample count, context digest, and per layer ``B_eff = s_i·B_i``
(float32), ``A`` with the chosen columns swapped to the end and zeroed (float32), ``k_i``, and
the CKKS ciphertexts of ``w_i·s_i·B_i·a_ij`` for the chosen columns (flat, in global-list order).
"""
