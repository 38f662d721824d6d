"""Evaluator: holds weight shards on its device and computes the encrypted products.

Pure logic (no broker). Forward ``Enc(X[:, lo:hi]) -> Enc(X[:, lo:hi]·W[:, lo:hi]ᵀ)`` (a row
shard; the aggregator sums); backward ``Enc(dY) -> Enc(dY·W[:, lo:hi])`` (a column shard; the
aggregator joins). Each (layer, direction) product is built lazily, on the first request, so
that start-up stays short and memory follows the layers really used. A layer whose sums are
wider than the exact bound returns each output once per sub-sum (``hecommon.exact``).

Hints are per data owner: request ``owner`` seeds and the manifest's layer seeds give each owner
its own ``a`` (``encrypt.owner_a_seed``), and ``OwnerHints`` keeps ``W·A`` for the owners served
most recently, built on each owner's first request of a layer.

``switch_a`` (the RabbitMQ worker): where this evaluator holds the whole output of a product (a
forward layer with one shard, or a backward shard, whose outputs the aggregator joins rather
than sums), its partials carry the owner's hint already switched to ``2^out_bits`` and packed,
computed once per owner and product; the mod-q hint is not kept. The aggregator passes that part into the reply
as it came, instead of unpacking, switching and packing the same constant for every request.
The result is bit-identical: the switch is the same function on the same values.

Where such an evaluator holds the whole layer (one shard: nothing to sum or join), it switches
``b`` as well (``answers``) and sends finished reply parts, which the aggregator forwards without
unpacking them: one hop's unpacking, switching and packing less per request, and a message of
4.75 bytes per output coefficient instead of 12.75 from evaluator to aggregator.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from hecommon import wire
from hecommon.bits import PackedRows
from hecommon.encrypt import EncryptedPartial, owner_a_seed, switch_a
from hecommon.errors import MalformedMessage, ParameterMismatch
from hecommon.evaluate import MatrixProduct
from hecommon.params import ParamSet
from hecommon.shards import Shard
from hecommon.wire import EncryptedRequest, PartialResult, RequestHead

#: Owners whose hints an evaluator keeps at once, by default (``--max-owners``).
MAX_OWNERS = 4


class OwnerHints:
    """The hints of the data owners an evaluator serves, least recently used first (pure).

    A hint is ``W·A`` for one owner's ``a`` of one (layer, direction): built on that owner's first
    request of the layer, kept (host memory: it goes into partials) for the owner's later requests,
    and dropped with all of that owner's hints once more than ``max_owners`` owners have been
    served since. An owner that comes back after that has its hints built again (same values: the
    seeds fix them). Each entry is the hint mod q, or switched and packed where the evaluator holds
    the whole output (``switch_a``), never both. Thread-safe, with a lock of its own: a metrics
    scrape reads ``owners`` and ``held_bytes`` without waiting for a product being built."""

    def __init__(self, max_owners: int = MAX_OWNERS) -> None:
        if not isinstance(max_owners, int) or max_owners < 1:
            raise ValueError(f"max_owners: a count >= 1 is required, got {max_owners!r}")
        self.max_owners = max_owners
        self.on_build: Callable[[float], None] | None = None  # the worker's metrics
        self.on_evict: Callable[[], None] | None = None
        self._owners: OrderedDict[bytes, dict[tuple[str, str], np.ndarray | PackedRows]] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0  # of every hint held
        self.built = 0  # hints built, all owners
        self.evicted = 0  # owners dropped to make room

    @staticmethod
    def _size(hint: np.ndarray | PackedRows) -> int:
        return hint.nbytes if isinstance(hint, np.ndarray) else len(hint.data)

    def get(self, owner: bytes, key: tuple[str, str]) -> np.ndarray | PackedRows | None:
        with self._lock:
            held = self._owners.get(owner)
            if held is None:
                return None
            self._owners.move_to_end(owner)
            return held.get(key)

    def put(self, owner: bytes, key: tuple[str, str], hint: np.ndarray | PackedRows, seconds: float) -> None:
        evicted = 0
        with self._lock:
            if owner not in self._owners:
                self._owners[owner] = {}
                while len(self._owners) > self.max_owners:
                    _, dropped = self._owners.popitem(last=False)
                    self._bytes -= sum(self._size(h) for h in dropped.values())
                    evicted += 1
            self._owners.move_to_end(owner)
            old = self._owners[owner].get(key)
            self._bytes += self._size(hint) - (self._size(old) if old is not None else 0)
            self._owners[owner][key] = hint
            self.evicted += evicted
            self.built += 1
        for _ in range(evicted):
            if self.on_evict is not None:
                self.on_evict()
        if self.on_build is not None:
            self.on_build(seconds)

    @property
    def owners(self) -> int:
        return len(self._owners)

    def held_bytes(self) -> int:
        return self._bytes


class EvaluatorHandler:
    def __init__(self, params: ParamSet, shards: list[Shard], shard_index: dict[str, tuple[int, int]],
                 backend: str = "numpy", gemm: str = "auto", switch_a: bool = False,
                 max_owners: int = MAX_OWNERS) -> None:
        """``shard_index[layer] = (index, count)`` of this evaluator's shard of that layer."""
        self.params = params
        self.switch_a = switch_a
        self.hints = OwnerHints(max_owners)
        self.backend = backend
        self.gemm = gemm
        self.shards = {s.layer: s for s in shards}
        self.shard_index = shard_index
        self._products: dict[tuple[str, str], MatrixProduct] = {}
        self._lock = threading.Lock()
        self.product_seconds = 0.0

    def layers(self) -> list[str]:
        return list(self.shards)

    def held_bytes(self) -> int:
        """Bytes of the weights this evaluator holds in host memory: the int8 shards and, for each
        product built so far, its float64 weight chunks (numpy backend), and every owner's hints."""
        total = sum(s.values.nbytes for s in self.shards.values())
        for product in list(self._products.values()):  # list(): a snapshot, safe from another thread
            if product.xp is np:
                total += product.held_bytes
        return total + self.hint_bytes()

    def hint_bytes(self) -> int:
        """Bytes of every owner's hints this evaluator keeps (host memory)."""
        return self.hints.held_bytes()

    def _product(self, layer: str, direction: str) -> MatrixProduct:
        """The weights of (layer, direction) on this evaluator's device, built on first use."""
        key = (layer, direction)
        with self._lock:
            if key not in self._products:
                s = self.shards[layer]
                if direction == "fwd":  # sums over the layer's inputs: this shard's are lo…hi
                    matrix, start, k = s.values, s.lo, s.sums_fwd
                else:  # sums over every output of the layer; this shard's outputs are lo…hi
                    matrix, start, k = np.ascontiguousarray(s.values.T), 0, s.sums_bwd
                self._products[key] = MatrixProduct(matrix, self.params, None, start, self.backend, self.gemm,
                                                    terms=s.terms, sub_sums=k)
            return self._products[key]

    def _a_part(self, layer: str, direction: str, owner: bytes, switched: bool) -> np.ndarray | PackedRows:
        """The public part of this shard's outputs for ``owner``'s ``a``: the hint mod q, or (``switched``)
        switched to ``2^out_bits`` and packed. Built once per owner, layer and direction."""
        key = (layer, direction)
        held = self.hints.get(owner, key)
        if held is not None:
            return held
        shard, product = self.shards[layer], self._product(layer, direction)
        t0 = time.perf_counter()
        hint = product.build_hint(owner_a_seed(shard.a_seed_fwd if direction == "fwd" else shard.a_seed_bwd, owner))
        part = PackedRows.pack(switch_a(hint, self.params), self.params.out_bits) if switched else hint
        self.hints.put(owner, key, part, time.perf_counter() - t0)
        return part

    def hint(self, layer: str, direction: str, owner: bytes) -> np.ndarray:
        """This shard's hint ``M·A`` mod q for ``owner``'s ``a``, (outputs, L, N) uint32: public, the same
        for every request of that owner (the embedded client reads it)."""
        if layer not in self.shards:
            raise ParameterMismatch(f"this evaluator does not hold layer {layer!r}")
        part = self._a_part(layer, direction, owner, switched=False)
        if isinstance(part, PackedRows):
            raise ParameterMismatch("this evaluator keeps switched hints only")
        return part

    def _prepare(self, req: EncryptedRequest | RequestHead) -> tuple[Shard, MatrixProduct, int, int,
                                                                     np.ndarray | PackedRows]:
        """Check ``req`` (a whole request, or the joined head of one whose parts were summed as they
        came) against this evaluator: (shard, product, shard index, shard count, the owner's ``a``
        part: the hint mod q, or switched and packed where this shard's outputs are not summed)."""
        shard = self.shards.get(req.layer)
        if shard is None:
            raise ParameterMismatch(f"this evaluator does not hold layer {req.layer!r}")
        if req.params != self.params:
            raise ParameterMismatch(f"request uses {req.params.name}, this evaluator {self.params.name}")
        if req.direction == "fwd" and (req.row_start, req.row_start + req.width) != (shard.lo, shard.hi):
            raise MalformedMessage(f"rows {req.row_start}…{req.row_start + req.width} do not match "
                                   f"this shard {shard.lo}…{shard.hi} of {req.layer}")
        product = self._product(req.layer, req.direction)
        if req.width != product.d_in:
            raise ParameterMismatch(f"batch has {req.width} ciphertexts, this layer takes {product.d_in}")
        index, count = self.shard_index.get(req.layer, (0, 1))
        whole = req.direction == "bwd" or count == 1  # this shard's outputs are not summed with others'
        a = self._a_part(req.layer, req.direction, req.owner, switched=self.switch_a and whole)
        return shard, product, index, count, a

    @staticmethod
    def _out_start(shard: Shard, direction: str) -> int:
        """First output row of this shard: forward all of them (summed), backward its outputs
        ``lo…hi``, each once per sub-sum (``exact.spread``'s order keeps them contiguous)."""
        return 0 if direction == "fwd" else shard.lo * shard.sums_bwd

    def answers(self, req: EncryptedRequest) -> bool:
        """Whether this evaluator finishes ``req``'s reply itself: it holds the whole layer (one
        shard) and sends the public part switched, so it switches ``b`` too (``wire.reply_part``)
        and each part it computes is a reply part, which the aggregator forwards as it came."""
        return self.switch_a and self.shard_index.get(req.layer, (0, 1))[1] == 1

    def handle(self, req: EncryptedRequest) -> PartialResult:
        shard, product, index, count, a = self._prepare(req)
        partial = product(req.batch, a=a)
        out_start = self._out_start(shard, req.direction)
        return PartialResult(rid=req.rid, layer=req.layer, direction=req.direction, shard=index, shards=count,
                             row_start=shard.lo, row_end=shard.hi, partial=partial, out_start=out_start,
                             send_a=req.send_a)

    def sums_parts(self, part: EncryptedRequest) -> bool:
        """Whether the parts of ``part``'s request are multiplied as they arrive (``add_part``):
        a request in several parts, to a layer this evaluator holds, on the float64 product."""
        return (part.parts > 1 and part.layer in self.shards
                and self._product(part.layer, part.direction).sums_parts)

    def add_part(self, total: Any, part: EncryptedRequest) -> Any:
        """``total`` plus the product of one request part (``MatrixProduct.add_rows``), checked
        against this shard's inputs; ``total`` None starts the sum. Once every part is in, the
        request's joined head and ``finish(total)`` go to ``handle_parts`` as its ``b``."""
        shard = self.shards.get(part.layer)
        if shard is None:
            raise ParameterMismatch(f"this evaluator does not hold layer {part.layer!r}")
        offset = part.row_start - shard.lo if part.direction == "fwd" else part.row_start
        return self._product(part.layer, part.direction).add_rows(total, part.batch, offset)

    def finish(self, part: EncryptedRequest | RequestHead, total: Any) -> np.ndarray:
        """The summed parts of a request as (d_out, L, N) uint32 residues on the host."""
        product = self._product(part.layer, part.direction)
        b = product.finish(total)
        return b if product.xp is np else product.xp.asnumpy(b)

    def handle_parts(self, req: EncryptedRequest | RequestHead, max_bytes: int,
                     b: np.ndarray | None = None) -> Iterator[PartialResult]:
        """``wire.split(handle(req), max_bytes)``, computed part by part: each part's output rows
        are multiplied only when it is asked for, so the caller sends one while the next is
        computed (the RabbitMQ worker, which sends each part on at once). ``b``: the product,
        already summed from the request's parts as they came (``add_part``); ``req`` is then
        the request's joined head."""
        shard, product, index, count, a = self._prepare(req)
        row_bytes = wire.partial_row_bytes(self.params, a_switched=isinstance(a, PackedRows))
        blocks = wire.row_ranges(product.d_out, row_bytes, max_bytes, PartialResult.TYPE)
        out_start = self._out_start(shard, req.direction)
        if b is None:
            if not isinstance(req, EncryptedRequest):
                raise TypeError("handle_parts: a request head needs its summed product b")
            rows = product.row_blocks(req.batch, blocks)
        else:
            if b.shape != (product.d_out, self.params.limbs, self.params.n):
                raise ParameterMismatch(f"the summed product is {b.shape}, this layer gives {product.d_out} outputs")
            rows = (b[lo:hi] for lo, hi in blocks)
        n_tokens = req.n_tokens if isinstance(req, RequestHead) else req.batch.n_tokens
        for i, ((lo, hi), rb) in enumerate(zip(blocks, rows, strict=True)):
            partial = EncryptedPartial(self.params, a[lo:hi], rb, n_tokens)
            yield PartialResult(rid=req.rid, layer=req.layer, direction=req.direction, shard=index, shards=count,
                                row_start=shard.lo, row_end=shard.hi, partial=partial, part=i, parts=len(blocks),
                                out_start=out_start + lo, send_a=req.send_a)
