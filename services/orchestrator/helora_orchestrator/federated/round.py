"""Federated rounds, embedded (DESIGN §5): N owners and an in-process aggregator, with every
coordinate encrypted (``scheme`` "full", ``encsum``) or SHE-LoRA's selected columns ("selective").

Every message between an owner and the aggregator goes through the federated wire codec
(``hecommon.wire.federated``), so the bytes counted here, and the bytes the aggregator decodes, are
exactly what would cross the broker. ``run_federation`` builds the owners on the tiny model (or
a real one) with a fresh shared CKKS key; ``run_round`` runs one round on existing objects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Protocol

from hecommon.errors import ConfigError
from hecommon.wire import federated as fedwire
from hecommon.wire.federated import (
    Aggregate,
    Contribution,
    Proposal,
    RoundPlan,
    SumAggregate,
    SumContribution,
)

from .client import Owner, OwnerConfig
from .report import RoundReport
from .selective import CkksKeys

#: embedded messages are not chunked: allow whole adapters of a small model
EMBEDDED_MAX_BYTES = 1 << 30


class Aggregator(Protocol):
    """What a round asks of the aggregator (in-process: ``embedded.federated_aggregator``)."""

    def plan(self, proposals: Sequence[Proposal], layers: Mapping[str, tuple[int, int]],
             rid: bytes) -> tuple[RoundPlan, dict[str, str]]: ...

    def aggregate(self, plan: RoundPlan, contributions: Sequence[bytes | Contribution],
                  max_bytes: int = ...) -> tuple[Aggregate, dict[str, str]]: ...

    def aggregate_sum(self, rid: bytes, contributions: Sequence[bytes | SumContribution], size: int,
                      max_bytes: int = ...) -> tuple[SumAggregate, dict[str, str]]: ...


def scheme_of(owners: Sequence[Owner]) -> str:
    """The scheme every owner of a round uses (``OwnerConfig.scheme``); mixed schemes are refused."""
    schemes = {o.cfg.scheme for o in owners}
    if len(schemes) != 1:
        raise ConfigError(f"owners: one scheme per federation, got {sorted(schemes)}")
    return schemes.pop()


def run_round(owners: list[Owner], aggregator: Aggregator, round_no: int,
              rid: bytes | None = None, tamper=None, train: bool = True) -> RoundReport:
    """Local training, negotiation, contributions, aggregation, merge; every message as bytes.

    ``train=False`` skips the local steps (the caller ran them). ``tamper`` (tests): a function ``(owner, contribution bytes) -> list of bytes`` standing in
    for a faulty or malicious sender; the aggregator must reject what is bad and go on.
    """
    rid = rid if rid is not None else os.urandom(fedwire.RID_BYTES)
    scheme = scheme_of(owners)
    report = RoundReport(round_no)
    for o in owners:
        report.train_loss[o.name] = o.train_local() if train else float("nan")
    if scheme == "full":
        return _sum_round(owners, aggregator, rid, report, tamper)
    proposals = []
    for o in owners:
        data = fedwire.encode(o.proposal(rid), EMBEDDED_MAX_BYTES)
        report.bytes_up[o.name] = len(data)
        proposals.append(fedwire.decode(data, EMBEDDED_MAX_BYTES, fedwire.Proposal))
    plan, rejected = aggregator.plan(proposals, owners[0].shapes(), rid)
    plan_bytes = fedwire.encode(plan, EMBEDDED_MAX_BYTES)
    plan = fedwire.decode(plan_bytes, EMBEDDED_MAX_BYTES, RoundPlan)  # type: ignore[assignment]
    received: list[bytes] = []
    for o in owners:
        data = fedwire.encode(o.contribute(plan), EMBEDDED_MAX_BYTES)
        report.bytes_up[o.name] += len(data)
        report.enc_seconds[o.name] = o.enc_seconds
        received.extend(tamper(o, data) if tamper else [data])
    agg, rej = aggregator.aggregate(plan, received, EMBEDDED_MAX_BYTES)
    report.rejected = {**rejected, **rej}
    agg_bytes = fedwire.encode(agg, EMBEDDED_MAX_BYTES)
    report.bytes_down = len(plan_bytes) + len(agg_bytes)
    agg = fedwire.decode(agg_bytes, EMBEDDED_MAX_BYTES, Aggregate)  # type: ignore[assignment]
    for o in owners:
        o.merge(agg)
        report.eval_loss[o.name] = o.eval_loss()
    report.plan, report.received, report.aggregate = plan, received, agg
    return report


def _sum_round(owners: list[Owner], aggregator: Aggregator, rid: bytes, report: RoundReport, tamper) -> RoundReport:
    """``--scheme full``: every owner's encrypted update, one encrypted sum, every owner merges it."""
    received: list[bytes] = []
    for o in owners:
        data = fedwire.encode(o.contribute_sum(rid, len(owners)), EMBEDDED_MAX_BYTES)
        report.bytes_up[o.name] = len(data)
        report.enc_seconds[o.name] = o.enc_seconds
        received.extend(tamper(o, data) if tamper else [data])
    agg, report.rejected = aggregator.aggregate_sum(rid, received, len(owners), EMBEDDED_MAX_BYTES)
    agg_bytes = fedwire.encode(agg, EMBEDDED_MAX_BYTES)
    report.bytes_down = len(agg_bytes)
    agg = fedwire.decode(agg_bytes, EMBEDDED_MAX_BYTES, SumAggregate)  # type: ignore[assignment]
    for o in owners:
        if o.name in agg.owners:
            o.merge_sum(agg)
        report.eval_loss[o.name] = o.eval_loss()
    report.received, report.aggregate = received, agg
    return report


def _load_base(model: str, seed: int):
    """(model, tokenizer, model id): the tiny random Llama, the bundled SmolLM2, or a path."""
    from ..data import ByteTokenizer

    if model == "tiny":
        from hecommon.model import tiny_llama

        return tiny_llama(seed)[0], ByteTokenizer(), f"tiny-llama(seed={seed})"
    from hecommon.model import BUNDLED_MODEL_ID, load_model, load_tokenizer

    path = None if model in ("smollm2", "") else model
    return load_model(path), load_tokenizer(path), path or BUNDLED_MODEL_ID


def build_owner_shard(cfg: OwnerConfig, index: int, count: int, model: str = "tiny", data=None, seed: int = 0,
                      keys: CkksKeys | None = None) -> Owner:
    """Owner ``index`` of ``count``: examples ``index, index + count, …`` of ``data``, its own
    train/held-out split, the base model of ``seed`` (the same for every owner)."""
    from ..data import pack, read_examples, split_examples

    base, tokenizer, model_id = _load_base(model, seed)
    train, held = split_examples(read_examples(data)[index::count])
    return Owner(cfg, base, pack(train, tokenizer, cfg.seq_len), pack(held, tokenizer, cfg.seq_len),
                 keys or CkksKeys.generate(), model_id)


def build_owners(configs: list[OwnerConfig], model: str = "tiny", data=None, seed: int = 0,
                 keys: CkksKeys | None = None) -> tuple[list[Owner], CkksKeys]:
    """Owners on the same base model, each with its own shard of the data (example ``i`` goes to
    owner ``i mod N``) and its own held-out split; one shared CKKS key."""
    if not configs or len({c.name for c in configs}) != len(configs):
        raise ValueError("owners: at least one, with distinct names")
    keys = keys or CkksKeys.generate()
    owners = [build_owner_shard(cfg, i, len(configs), model, data, seed, keys) for i, cfg in enumerate(configs)]
    return owners, keys


def run_federation(configs: list[OwnerConfig], rounds: int = 2, model: str = "tiny", data=None, seed: int = 0,
                   keys: CkksKeys | None = None, on_round=None) -> list[RoundReport]:
    """``rounds`` embedded rounds; ``on_round(report)`` is called after each (the CLI prints)."""
    from ..embedded import federated_aggregator

    owners, keys = build_owners(configs, model, data, seed, keys)
    aggregator = federated_aggregator(keys.public_bytes())
    reports = []
    for r in range(1, rounds + 1):
        report = run_round(owners, aggregator, r)
        reports.append(report)
        if on_round:
            on_round(report)
    return reports
