"""Evaluator: holds weight shards on its device and computes the encrypted products.

Pure logic (no broker). Forward ``Enc(X[:, lo:hi]) -> Enc(X[:, lo:hi]·W[:, lo:hi]ᵀ)`` (a row
shard; the aggregator sums); backward ``Enc(dY) -> Enc(dY·W[:, lo:hi])`` (a column shard; the
aggregator joins). Each (layer, direction) product is built lazily, on the first request, so
that start-up stays short and memory follows the layers really used. A layer whose sums are
wider than the exact bound returns each output once per sub-sum (``hecommon.he.exact``).

Hints are per data owner: request ``owner`` seeds and the manifest's layer seeds give each owner
its own ``a`` (``sampling.owner_a_seed``), and ``OwnerHints`` keeps ``W·A`` for the owners served
most recently, built on each owner's first request of a layer.

Every request part is computed alone: no state is kept between the parts of a request, so any
replica of an evaluator queue computes any part it receives. A part covering some of this shard's
inputs gives that *piece* of the sum (``MatrixProduct.piece``); its ``a`` part is the hint over
the same rows, built once per owner and rows.

``send_switched`` (the RabbitMQ worker): where nothing is added to this evaluator's outputs after it
(the whole layer on one shard, or the only piece of a backward column shard, which the aggregator
joins), the ``a`` part goes out already switched to ``2^out_bits`` and packed, computed once per
owner, product and rows; the mod-q hint is not kept. Where this evaluator holds the whole layer it
switches ``b`` as well (``answers_client``) and sends finished reply parts straight to the client (the
direct path, ``hecommon.route``): 4.75 bytes per output coefficient, one hop. The result is
bit-identical: the switch is the same function on the same values.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

import numpy as np
from hecommon import wire
from hecommon.errors import MalformedMessage, ParameterMismatch
from hecommon.he.bits import PackedRows
from hecommon.he.encrypt import ClientA, EncryptedPartial, switch_a
from hecommon.he.evaluate import MatrixProduct
from hecommon.he.params import ParamSet
from hecommon.he.sampling import owner_a_seed
from hecommon.shards import Shard
from hecommon.wire import EncryptedReply, EncryptedRequest, PartialResult

#: Owners whose hints an evaluator keeps at once, by default (``--max-owners``).
MAX_OWNERS = 4


class OwnerHints:
    """The hints of the data owners an evaluator serves, least recently used first (pure).

    A hint is ``W·A`` for one owner's ``a`` of one (layer, direction): built on that owner's first
    request of the layer, kept (host memory: it goes into partials) for the owner's later requests,
    and dropped with all of that owner's hints once more than ``max_owners`` owners have been
    served since. An owner that comes back after that has its hints built again (same values: the
    seeds fix them). Each entry is the hint mod q, or switched and packed where the evaluator holds
    the whole output (``send_switched``), never both. Thread-safe, with a lock of its own: a metrics
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
                 backend: str = "numpy", gemm: str = "auto", send_switched: bool = False,
                 max_owners: int = MAX_OWNERS) -> None:
        """``shard_index[layer] = (index, count)`` of this evaluator's shard of that layer."""
        self.params = params
        self.send_switched = send_switched
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

    def _public_a(self, layer: str, direction: str, owner: bytes, switched: bool,
                rows: tuple[int, int] | None = None) -> np.ndarray | PackedRows:
        """The public part of this shard's outputs for ``owner``'s ``a`` over its input rows ``rows``
        (default: all of them): the hint mod q, or (``switched``) switched to ``2^out_bits`` and
        packed. Built once per owner, layer, direction and rows."""
        product = self._product(layer, direction)
        rows = rows or (0, product.d_in)
        key = (layer, direction, *rows, switched)
        held = self.hints.get(owner, key)
        if held is not None:
            return held
        shard = self.shards[layer]
        t0 = time.perf_counter()
        hint = product.build_hint(owner_a_seed(shard.a_seed_fwd if direction == "fwd" else shard.a_seed_bwd, owner),
                                  rows)
        part = PackedRows.pack(switch_a(hint, self.params), self.params.out_bits) if switched else hint
        self.hints.put(owner, key, part, time.perf_counter() - t0)
        return part

    def hint(self, layer: str, direction: str, owner: bytes) -> np.ndarray:
        """This shard's hint ``M·A`` mod q for ``owner``'s ``a``, (outputs, L, N) uint32: public, the same
        for every request of that owner (the embedded client reads it)."""
        if layer not in self.shards:
            raise ParameterMismatch(f"this evaluator does not hold layer {layer!r}")
        part = self._public_a(layer, direction, owner, switched=False)
        assert isinstance(part, np.ndarray)  # switched=False: the hint mod q
        return part

    def _prepare(self, req: EncryptedRequest) -> tuple[Shard, MatrixProduct, int, int, int,
                                                       np.ndarray | PackedRows]:
        """Check one request part against what this evaluator holds, as strictly as a server that
        trusts nothing (the client addresses evaluators directly): the layer, the parameter set and
        the part's input rows inside this shard's. Returns (shard, product, its input offset in the
        product, shard index, shard count, the owner's ``a`` part over those rows: switched and
        packed where nothing is summed after this evaluator, mod q otherwise)."""
        shard = self.shards.get(req.layer)
        if shard is None:
            raise ParameterMismatch(f"this evaluator does not hold layer {req.layer!r}")
        if req.params != self.params:
            raise ParameterMismatch(f"request uses {req.params.name}, this evaluator {self.params.name}")
        product = self._product(req.layer, req.direction)
        first = shard.lo if req.direction == "fwd" else 0  # the product's input 0, in the layer's rows
        offset = req.row_start - first
        if offset < 0 or offset + req.width > product.d_in:
            held = (first, first + product.d_in)
            raise MalformedMessage(f"layer {req.layer} {req.direction}: rows {req.row_start}…{req.row_start + req.width} "
                                   f"are outside the rows {held[0]}…{held[1]} this evaluator multiplies")
        if req.parts > product.d_in:
            raise MalformedMessage(f"layer {req.layer} {req.direction}: {req.parts} parts for {product.d_in} inputs")
        index, count = self.shard_index.get(req.layer, (0, 1))
        # the a part goes out switched where nothing is added to it after this evaluator: the whole
        # layer (each piece is answered alone), or a column shard's only piece (the aggregator joins)
        switched = self.send_switched and (count == 1 or (req.direction == "bwd" and req.parts == 1))
        a = self._public_a(req.layer, req.direction, req.owner, switched, (offset, offset + req.width))
        return shard, product, offset, index, count, a

    @staticmethod
    def _out_start(shard: Shard, direction: str) -> int:
        """First output row of this shard: forward all of them (summed), backward its outputs
        ``lo…hi``, each once per sub-sum (``exact.spread``'s order keeps them contiguous)."""
        return 0 if direction == "fwd" else shard.lo * shard.sums_bwd

    def answers_client(self, req: EncryptedRequest) -> bool:
        """Whether this evaluator answers the client itself: it holds the whole layer (one shard)
        and sends the public part switched, so it switches ``b`` too (``reply_part``) and
        each part it computes is a reply part, straight to the client's ``reply_to``."""
        return self.send_switched and self.shard_index.get(req.layer, (0, 1))[1] == 1

    @staticmethod
    def reply_part(partial: PartialResult) -> EncryptedReply:
        """The reply for one part of a one-shard partial whose ``a`` part is switched: ``b`` switched,
        ``a`` as it came (or left out, if the request said ``send_a=False``), the same rows, part and
        piece numbers (each part is answered alone, as it comes)."""
        result = partial.partial.switch(ClientA.NOTHING if partial.send_a else ClientA.SWITCHED)
        return EncryptedReply(rid=partial.rid, layer=partial.layer, direction=partial.direction, result=result,
                              part=partial.part, parts=partial.parts, out_start=partial.out_start,
                              piece=partial.piece, pieces=partial.pieces)

    def handle(self, req: EncryptedRequest) -> PartialResult:
        """The whole partial of one request part (the embedded server's path)."""
        (partial,) = self.handle_parts(req, sys.maxsize)  # in-process: no message limit, one block
        return partial

    def handle_parts(self, req: EncryptedRequest, max_bytes: int) -> Iterator[PartialResult]:
        """The product of one request part (any part: no state is kept between them, so replicas
        of one queue may share a request's parts), cut into output rows below ``max_bytes`` and
        computed block by block where the part holds every input, so the caller sends one block
        while the next is computed (the RabbitMQ worker sends each at once). Each is the
        ``piece`` ``req.part`` of ``req.parts``."""
        shard, product, offset, index, count, a = self._prepare(req)
        row_bytes = wire.partial_row_bytes(self.params, a_switched=isinstance(a, PackedRows))
        blocks = wire.row_ranges(product.d_out, row_bytes, max_bytes, PartialResult.TYPE)
        out_start = self._out_start(shard, req.direction)
        if offset == 0 and req.width == product.d_in:
            rows = product.row_blocks(req.batch, blocks)
        else:  # a part of the inputs: its piece of the sum, then cut
            b = product.piece(req.batch.b, offset)
            rows = (b[lo:hi] for lo, hi in blocks)
        for i, ((lo, hi), rb) in enumerate(zip(blocks, rows, strict=True)):
            partial = EncryptedPartial(self.params, a[lo:hi], rb, req.batch.n_tokens, req.batch.col0)
            yield PartialResult(rid=req.rid, layer=req.layer, direction=req.direction, shard=index, shards=count,
                                row_start=req.row_start, row_end=req.row_start + req.width, partial=partial,
                                part=i, parts=len(blocks), out_start=out_start + lo, send_a=req.send_a,
                                piece=req.part, pieces=req.parts)
