"""Where each part of a request goes: the direct path from the client to the evaluators (DESIGN §4).

The manifest says how many evaluators share each layer (``LayerEntry.shards``; the encoder's
``--shards`` plan). With that, the client addresses every message itself: a request part goes
from the client to the evaluator queue(s) that hold its layer (routing key
``{layer}.s{i}of{n}`` on ``{ns}.requests``), and the answer comes straight back, unless
shards must be combined:

- one shard (the whole layer on one evaluator): the evaluator answers each request part alone,
  with switched reply parts to the client's ``reply_to``. A request of several parts (wider
  than one message) comes back as that many *pieces*, each the sum over its part's input rows;
  the client adds the decrypted pieces, exact integers, as it adds sub-sums (``hecommon.he.exact``).
  Two hops in all, and no evaluator state: any replica of the queue computes any part.
- several shards: forward, shard ``i`` receives the input rows ``lo…hi`` it holds (a row
  shard, cut into parts below the message limit); backward, every shard receives every part
  (a column shard). Each evaluator sends one partial per part to the aggregator, which adds the
  pieces of each shard, sums (forward) or joins (backward) the shards, and answers once.

Pure: numbers in, numbers out; the broker client, the embedded server and the tests share it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import MalformedMessage
from .he.params import ParamSet
from .shards import even_split
from .wire import MAX_MESSAGE_BYTES, EncryptedRequest, LayerEntry, request_ranges


@dataclass(frozen=True)
class Piece:
    """One message of a request: input rows ``lo…hi`` of the layer call, part ``part`` of the
    ``parts`` its shard(s) receive, sent to each shard index in ``shards``."""

    lo: int
    hi: int
    part: int
    parts: int
    shards: tuple[int, ...]


def width(entry: LayerEntry, direction: str) -> int:
    """Input ciphertexts of a request: ``d_in`` forward, ``d_out`` backward."""
    return entry.d_in if direction == "fwd" else entry.d_out


def pieces(entry: LayerEntry, direction: str, params: ParamSet, max_bytes: int = MAX_MESSAGE_BYTES) -> list[Piece]:
    """Every message of one request to ``entry``, in the order the client sends them."""
    if direction == "fwd" and entry.shards > 1:
        out = []
        for shard, (lo, hi) in enumerate(even_split(entry.d_in, entry.shards)):
            ranges = request_ranges(hi - lo, params, max_bytes)
            out += [Piece(lo + a, lo + b, k, len(ranges), (shard,)) for k, (a, b) in enumerate(ranges)]
        return out
    ranges = request_ranges(width(entry, direction), params, max_bytes)
    every = tuple(range(entry.shards))
    return [Piece(a, b, k, len(ranges), every) for k, (a, b) in enumerate(ranges)]


def reply_pieces(entry: LayerEntry, direction: str, params: ParamSet, max_bytes: int = MAX_MESSAGE_BYTES) -> int:
    """How many pieces the reply to a request comes in: one per request part from an evaluator
    that holds the whole layer, one from the aggregator otherwise."""
    return len(pieces(entry, direction, params, max_bytes)) if entry.shards == 1 else 1


def targets(entry: LayerEntry, part: EncryptedRequest) -> tuple[int, ...]:
    """The shard indices that receive ``part``: forward on a sharded layer, the one whose input
    rows hold it (it must not cross a shard's edge); otherwise every shard."""
    if part.direction != "fwd" or entry.shards == 1:
        return tuple(range(entry.shards))
    lo, hi = part.row_start, part.row_start + part.width
    for shard, (s_lo, s_hi) in enumerate(even_split(entry.d_in, entry.shards)):
        if s_lo <= lo < s_hi:
            if hi > s_hi:
                raise MalformedMessage(f"layer {entry.name} fwd: rows {lo}…{hi} cross the edge of shard {shard} "
                                       f"({s_lo}…{s_hi})")
            return (shard,)
    raise MalformedMessage(f"layer {entry.name} fwd: rows {lo}…{hi} outside its {entry.d_in} inputs")


def cut(entry: LayerEntry, request: EncryptedRequest) -> list[tuple[int, EncryptedRequest]]:
    """A whole request (one message, as the embedded server takes it) as (shard, sub-request)
    pairs: forward on a sharded layer, each shard's input rows; otherwise the request to every shard."""
    if request.parts != 1 or request.row_start != 0 or request.width != width(entry, request.direction):
        raise MalformedMessage(f"layer {entry.name} {request.direction} takes {width(entry, request.direction)} "
                               f"ciphertexts in one request, got {request.width} (part {request.part}/{request.parts})")
    if request.direction != "fwd" or entry.shards == 1:
        return [(i, request) for i in range(entry.shards)]
    b = request.batch
    return [(i, dataclasses.replace(request, batch=b.rows(b.b[lo:hi]), row_start=lo))
            for i, (lo, hi) in enumerate(even_split(entry.d_in, entry.shards))]
