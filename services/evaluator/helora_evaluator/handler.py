"""Evaluator: holds weight shards on its device and computes the encrypted products.

Pure logic (no broker). Forward ``Enc(X[:, lo:hi]) -> Enc(X[:, lo:hi]·W[:, lo:hi]ᵀ)`` (a row
shard; the aggregator sums); backward ``Enc(dY) -> Enc(dY·W[:, lo:hi])`` (a column shard; the
aggregator joins). Each (layer, direction) product precomputes its hint ``W·A`` lazily, on the
first request, so that start-up stays short and memory follows the layers really used.

``switch_a`` (the RabbitMQ worker): where this evaluator holds the whole output of a product (a
forward layer with one shard, or a backward shard, whose outputs the aggregator joins rather
than sums), its partials carry the hint already switched to ``2^out_bits`` and packed, computed
once per product; the mod-q hint is then dropped. The aggregator passes that part into the reply
as it came, instead of unpacking, switching and packing the same constant for every request.
The result is bit-identical: the switch is the same function on the same values.

Where such an evaluator holds the whole layer (one shard: nothing to sum or join), it switches
``b`` as well (``answers``) and sends finished reply parts, which the aggregator forwards without
unpacking them: one hop's unpacking, switching and packing less per request, and a message of
4.75 bytes per output coefficient instead of 12.75 from evaluator to aggregator.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from hecommon import wire
from hecommon.bits import PackedRows
from hecommon.encrypt import EncryptedPartial, switch_a
from hecommon.errors import MalformedMessage, ParameterMismatch
from hecommon.evaluate import MatrixProduct
from hecommon.params import ParamSet
from hecommon.wire import EncryptedRequest, PartialResult, RequestHead
from helora_encoder.handler import Shard


class EvaluatorHandler:
    def __init__(self, params: ParamSet, shards: list[Shard], shard_index: dict[str, tuple[int, int]],
                 backend: str = "numpy", gemm: str = "auto", switch_a: bool = False) -> None:
        """``shard_index[layer] = (index, count)`` of this evaluator's shard of that layer."""
        self.params = params
        self.switch_a = switch_a
        self._switched: dict[tuple[str, str], PackedRows] = {}
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
        product built so far, its float64 weight chunks and hint (numpy backend; a metric)."""
        total = sum(s.values.nbytes for s in self.shards.values())
        for product in list(self._products.values()):  # list(): a snapshot, safe from another thread
            if product.xp is np:
                total += product.held_bytes
        return total + sum(len(a.data) for a in list(self._switched.values()))

    def _product(self, layer: str, direction: str) -> MatrixProduct:
        key = (layer, direction)
        with self._lock:
            if key not in self._products:
                s = self.shards[layer]
                if direction == "fwd":
                    self._products[key] = MatrixProduct(s.values, self.params, s.a_seed_fwd, s.lo, self.backend,
                                                                 self.gemm)
                else:
                    matrix = np.ascontiguousarray(s.values.T)  # (hi - lo, d_out)
                    self._products[key] = MatrixProduct(matrix, self.params, s.a_seed_bwd, 0, self.backend, self.gemm)
            return self._products[key]

    def _switched_hint(self, layer: str, direction: str, product: MatrixProduct) -> PackedRows:
        key = (layer, direction)
        with self._lock:
            if key not in self._switched:
                self._switched[key] = PackedRows.pack(switch_a(product.hint, self.params), self.params.out_bits)
                product.release_hint()
            return self._switched[key]

    def hint(self, layer: str, direction: str) -> np.ndarray:
        """This shard's hint ``M·A`` mod q, (outputs, L, N) uint32: public, the same for every request."""
        if layer not in self.shards:
            raise ParameterMismatch(f"this evaluator does not hold layer {layer!r}")
        return self._product(layer, direction).hint

    def _prepare(self, req: EncryptedRequest | RequestHead) -> tuple[Shard, MatrixProduct, int, int, PackedRows | None]:
        """Check ``req`` (a whole request, or the joined head of one whose parts were summed as they
        came) against this evaluator: (shard, product, shard index, shard count, switched hint or None)."""
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
        a = self._switched_hint(req.layer, req.direction, product) if self.switch_a and whole else None
        return shard, product, index, count, a

    def answers(self, req: EncryptedRequest) -> bool:
        """Whether this evaluator finishes ``req``'s reply itself: it holds the whole layer (one
        shard) and sends the public part switched, so it switches ``b`` too (``wire.reply_part``)
        and each part it computes is a reply part, which the aggregator forwards as it came."""
        return self.switch_a and self.shard_index.get(req.layer, (0, 1))[1] == 1

    def handle(self, req: EncryptedRequest) -> PartialResult:
        shard, product, index, count, a = self._prepare(req)
        partial = product(req.batch, a=a)
        out_start = 0 if req.direction == "fwd" else shard.lo
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
        row_bytes = wire.partial_row_bytes(self.params, a_switched=a is not None)
        blocks = wire.row_ranges(product.d_out, row_bytes, max_bytes, PartialResult.TYPE)
        out_start = 0 if req.direction == "fwd" else shard.lo
        hint = a if a is not None else product.hint
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
            partial = EncryptedPartial(self.params, hint[lo:hi], rb, n_tokens)
            yield PartialResult(rid=req.rid, layer=req.layer, direction=req.direction, shard=index, shards=count,
                                row_start=shard.lo, row_end=shard.hi, partial=partial, part=i, parts=len(blocks),
                                out_start=out_start + lo, send_a=req.send_a)
