"""The encrypted backend: the client's side of every block linear (DESIGN §1–§3).

Per request: quantize rows (per token), encrypt under a fresh per-request secret, send, decrypt
the switched reply, and apply the zero-point correction and scales from the public manifest.
Rows are processed in requests of at most N tokens; quantization is per row, so cutting rows
into requests changes nothing. The result is bit-for-bit that of ``QuantizedBackend``: the
manifest was checked when it was decoded (every layer exact, its sums split where they are wider
than the bound the client computes itself: ``hecommon.he.exact``, ``wire.Manifest``), and sub-sums
are added after decryption.

Each backend draws an ``owner`` seed from the OS CSPRNG: with the manifest's seed of a layer it
fixes the public ``a`` of this session's requests (``sampling.owner_a_seed``), so the server alone
does not choose it and no two owners or sessions share one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import threadpoolctl
from hecommon import heap, route, wire
from hecommon.errors import HeloraError, ParameterMismatch
from hecommon.he import params as P
from hecommon.he.bits import PackedRows, packed_size
from hecommon.he.encrypt import decrypt, encrypt
from hecommon.he.exact import fold
from hecommon.he.keys import NONCE_BYTES, RequestSecret, SecretKey
from hecommon.he.masks import decrypt_masked, encrypt_masked, input_masks, output_masks
from hecommon.he.quantize import dequantize_backward, dequantize_forward, quantize_rows
from hecommon.he.sampling import owner_a_seed

#: Default budget of switched ``a`` parts a broker client keeps (``EncryptedBackend(hold_a_bytes=)``),
#: in MiB: SmolLM2-135M needs about 2.8 GiB for all of its layers (one a part per reply piece).
HOLD_A_MIB = 4096

#: Coefficients whose ``a·s`` products a generation session computes at once (``EncryptedBackend.session``):
#: whole-ring transforms once per this many generated tokens, a few MB of masks per layer.
SESSION_WINDOW = 64
#: The widest window a generation asks for (``ClientModel.generate``: its prompts and new tokens, up
#: to this): SmolLM2's masks take about 2 MB per coefficient.
MAX_SESSION_WINDOW = 128

#: request -> (reply, bytes moved): the embedded server's ``exchange`` or a ``ByteTransport``
Exchange = Callable[[wire.EncryptedRequest], tuple[wire.EncryptedReply, int]]


class ByteTransport:
    """Adapts a transport of encoded chunks (``list[wire.Pieces] -> list[bytes]``) to an ``Exchange``.

    Splits requests below the message-size limit, joins reply chunks, and raises on an
    ``ErrorReply``; counts the bytes really sent and received. ``send`` gets each request message
    as ``wire.Pieces`` (its arrays not joined, as the broker client publishes them), the replies'
    as ``bytes``.
    """

    def __init__(self, send: Callable[[list[wire.Pieces]], list[bytes]], max_message_bytes: int = wire.MAX_MESSAGE_BYTES):
        self.send = send
        self.limit = max_message_bytes

    def plan(self, entry: wire.LayerEntry, direction: str, params: P.ParamSet) -> tuple[list[route.Piece], int]:
        """(the request's parts, the reply's pieces): ``wire.split``'s cuts of one whole request,
        which the server routes itself and answers in one piece."""
        ranges = wire.request_ranges(route.width(entry, direction), params, self.limit)
        return [route.Piece(lo, hi, i, len(ranges), (0,)) for i, (lo, hi) in enumerate(ranges)], 1

    def __call__(self, request: wire.EncryptedRequest) -> tuple[wire.EncryptedReply, int]:
        parts: list[wire.EncryptedReply] = []
        moved = self.stream(wire.split(request, self.limit), parts.append)
        return wire.join(parts), moved

    def stream(self, parts: Iterable[wire.EncryptedRequest], on_part: Callable[[wire.EncryptedReply], None]) -> int:
        """The broker client's interface (``BrokerTransport.stream``): the request given as its
        parts, ``on_part`` called on each reply part (once, checked as ``join`` checks them), so
        the client decrypts part by part here too. Returns the bytes sent and received."""
        parts = list(parts)
        chunks = [wire.encode_request_pieces(p, self.limit) for p in parts]
        replies = self.send(chunks)
        tracker = wire.PartTracker()
        for body in replies:
            msg = wire.decode(body, self.limit)
            if isinstance(msg, wire.ErrorReply):
                raise HeloraError(f"server error on layer {parts[0].layer} {parts[0].direction}: "
                                  f"{msg.reason}: {msg.message}")
            if not isinstance(msg, wire.EncryptedReply):
                raise HeloraError(f"layer {parts[0].layer}: the server answered with a {type(msg).__name__}")
            if tracker.add(msg):
                on_part(msg)
        if not tracker.complete:
            raise HeloraError(f"layer {parts[0].layer} {parts[0].direction}: the reply's parts are incomplete")
        return sum(map(len, chunks)) + sum(map(len, replies))


class _LayerSession:
    """One (layer, direction) in a session: its secret, its next unused coefficient and the ``a·s``
    products of the current window of coefficients (``hecommon.he.masks``)."""

    def __init__(self, key: SecretKey, params: P.ParamSet) -> None:
        self.key, self.params = key, params
        self.secrets = 0
        self._renew()

    def _renew(self) -> None:
        self.secret: RequestSecret = self.key.request_secret(self.params, os.urandom(NONCE_BYTES))
        self.secrets += 1
        self.next = 0  # coefficients below it have carried a token under this secret
        self.window = (0, 0)
        self.inputs: np.ndarray | None = None  # (layer inputs, L, window) -a·s mod p
        self.outputs: dict[tuple[int, int, int, int], np.ndarray] = {}  # (piece, lo, hi, bits) -> (rows, window)

    def take(self, t: int, window: int) -> tuple[int, bool]:
        """The first of ``t`` coefficients never used under this secret (a new secret past N), and
        whether they are masked: with a window of masks that covers them where ``t`` fits in one
        (``window``); a wider request (a long prompt) is encrypted and decrypted without masks, so
        none are held for it."""
        if self.next + t > self.params.n:
            self._renew()
        col0 = self.next
        self.next += t
        if t > window:
            return col0, False
        lo, hi = self.window
        if not lo <= col0 <= col0 + t <= hi:
            self.window = (col0, min(self.params.n, col0 + window))
            self.inputs, self.outputs = None, {}
        return col0, True


class Session:
    """A generation session (``EncryptedBackend.session``): per (layer, direction), one secret whose
    coefficients carry tokens in order, each once; a new secret once the N are used."""

    def __init__(self, key: SecretKey, params: P.ParamSet, window: int) -> None:
        if not isinstance(window, int) or not 1 <= window <= params.n:
            raise ValueError(f"session window: 1..{params.n} coefficients, got {window!r}")
        self.key, self.params, self.window = key, params, window
        self.layers: dict[tuple[str, str], _LayerSession] = {}
        self.lock = threading.Lock()  # one request of the session at a time

    def layer(self, name: str, direction: str) -> _LayerSession:
        key = (name, direction)
        if key not in self.layers:
            self.layers[key] = _LayerSession(self.key, self.params)
        return self.layers[key]

    @property
    def secrets(self) -> int:
        """Secrets drawn so far, over all layers (one per layer, and one more each time a layer's N
        coefficients are used up)."""
        return sum(s.secrets for s in self.layers.values())


class EncryptedBackend:
    """Implements ``LinearBackend`` over a transport (embedded server or RabbitMQ)."""

    def __init__(self, manifest: wire.Manifest, transport: Exchange, key: SecretKey | None = None,
                 hints: Callable[[str, str, bytes], np.ndarray] | None = None, hold_a_bytes: int = 0,
                 owner: bytes | None = None) -> None:
        """``hints(layer, direction, owner)``: the public hint of a layer for this owner's ``a``,
        fetched once, for servers that reply without the ``a`` part (the same for every request).
        ``owner``: this session's public seed (default: 16 fresh bytes of ``os.urandom``).

        ``hold_a_bytes`` (without hints): keep the switched ``a`` part of the first reply of each
        (layer, direction), packed as it came, up to this many bytes in all, and ask for ``b``
        alone after that (``send_a=False``): the ``a`` part is the same for every request of this session's
        layer, and it is half of every reply. Layers beyond the budget keep receiving it."""
        heap.reuse_freed_memory()  # large temporaries from freed memory, not fresh pages (hecommon.heap)
        self.manifest = manifest  # exact or refused: checked when it was made or decoded (wire.Manifest)
        self.params = manifest.params
        self.owner = os.urandom(wire.OWNER_BYTES) if owner is None else owner
        if not isinstance(self.owner, bytes) or len(self.owner) != wire.OWNER_BYTES:
            raise ValueError(f"owner: {wire.OWNER_BYTES} bytes are required")
        self.bits = manifest.x_bits
        self.layers = {e.name: e for e in manifest.layers}
        self.transport = transport
        self.key = key or SecretKey.generate()
        self.wire_bytes = 0
        self.requests = 0
        #: multiply-adds the server's GEMMs did for this client's requests: inputs × outputs × tokens × limbs
        self.server_madds = 0
        #: seconds spent encrypting, decrypting, and in whole linear calls (server and wire included),
        #: summed over threads (``runlog.phase_seconds`` splits a training step with them)
        self.seconds = {"encrypt": 0.0, "decrypt": 0.0, "linear": 0.0}
        self._count_lock = threading.Lock()  # requests may come from several threads (--in-flight)
        self._buffers = threading.local()  # per thread: decrypted integers (``_scratch``)
        self._fetch_hint = hints
        self._hints: dict[tuple[str, str], np.ndarray] = {}
        if not isinstance(hold_a_bytes, int) or hold_a_bytes < 0:
            raise ValueError(f"hold_a_bytes: a byte count >= 0 is required, got {hold_a_bytes!r}")
        self.hold_a_bytes = 0 if hints is not None else hold_a_bytes
        self._held: dict[tuple[str, str], tuple[PackedRows, ...]] = {}  # one a part per reply piece
        self.held_bytes = 0
        self._session: Session | None = None

    @contextlib.contextmanager
    def session(self, window: int = SESSION_WINDOW) -> Iterator[Session]:
        """Requests made inside put their tokens in consecutive coefficients under one secret per
        layer and direction (a new one once N are used, never a coefficient twice), so the client's
        ``a·s`` products are computed once per ``window`` coefficients and each request costs in
        proportion to its tokens (``docs/threat-model.md``, "Column windows"): private generation,
        one token per step. The ciphertexts are those of separate requests, bit for bit in what
        they decrypt to."""
        if self._session is not None:
            raise HeloraError("a session is already open on this backend")
        self._session = Session(self.key, self.params, window)
        try:
            # one token a step: numpy's BLAS threads (OpenBLAS) get small products only, and keep
            # spinning after each, taking the cores the model's attention runs on (measured on
            # SmolLM2 on 2 cores: 2.0 tokens/s with two threads, 4.1 with one)
            with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
                yield self._session
        finally:
            self._session = None

    def _entry(self, group: str) -> wire.LayerEntry:
        entry = self.layers.get(group)
        if entry is None:
            raise ParameterMismatch(f"the server's manifest has no layer {group!r}")
        return entry

    def _call(self, layer: str, direction: str, m: np.ndarray, a_seed: bytes) -> np.ndarray:
        """Encrypt ``m`` (T <= N, d) under a fresh secret, send, decrypt the integer result (in this
        thread's scratch buffer: valid until its next call).

        Over a transport that streams (``stream(parts, on_part)``: the broker client), the request
        is encrypted part by part (the transport's ``plan``: below the message limit, and cut at
        the shards' edges where the client addresses the evaluators itself) and each part is sent
        as soon as it is encrypted, while the next is encrypted; each reply part is decrypted into
        its columns as soon as it arrives, while the server still computes and sends the next.
        A reply in several pieces (an evaluator answers each request part alone) is added up
        piece by piece: exact integers, like sub-sums. Otherwise the whole request is encrypted
        and the whole reply decrypted at once. Inside a ``session`` the secret is the session's and
        the tokens take its next coefficients."""
        session = self._session
        if session is not None:
            with session.lock:
                return self._call_in(layer, direction, m, a_seed, session.layer(layer, direction), session.window)
        return self._call_in(layer, direction, m, a_seed, None, 0)

    def _call_in(self, layer: str, direction: str, m: np.ndarray, a_seed: bytes, state: _LayerSession | None,
                 window: int) -> np.ndarray:
        """``_call`` under a fresh secret (``state`` None) or the next coefficients of a session's."""
        t_call = time.perf_counter()
        spent = {"encrypt": 0.0, "decrypt": 0.0}
        t = m.shape[0]
        if state is None:
            secret, col0 = self.key.request_secret(self.params, os.urandom(NONCE_BYTES)), 0
        else:
            col0, masked = state.take(t, window)
            secret = state.secret  # after take, which may have drawn a new one
            if not masked:  # wider than a window: the session's secret and coefficients, no masks
                state = None
        rid = os.urandom(wire.RID_BYTES)
        entry = self.layers[layer]
        width = entry.out_rows(direction)  # each output once per sub-sum
        a_seed = owner_a_seed(a_seed, self.owner)  # this session's a of the layer (one SHAKE-256)
        stream = getattr(self.transport, "stream", None)
        plan, pieces = self.transport.plan(entry, direction, self.params) if stream is not None else ([], 1)
        out = self._scratch(t * width).reshape(t, width)
        if pieces > 1:
            out.fill(0)
        filled = [0]
        held = self._held.get((layer, direction))
        if held is not None and len(held) != pieces:
            held = None  # held for another cut of the layer (another message limit): ask for a again
        collect = held is None and self._wants_a(layer, direction, width * pieces)
        got_a: dict[tuple[int, int], PackedRows] = {}  # (piece, out_start) -> this reply's a rows, to hold

        def decrypt_part(part: wire.EncryptedReply) -> None:
            lo, hi = part.out_start, part.out_start + part.result.width
            if (part.rid != rid or hi > width or part.result.n_tokens != t
                    or part.result.col0 != col0 or part.pieces != pieces):
                raise HeloraError(f"the reply to layer {layer} {direction} does not match the request")
            result, hint = part.result, None
            if result.a is None and result.bits == self.params.out_bits:  # b alone: the a part held
                if held is None:
                    raise HeloraError(f"the reply to layer {layer} {direction} has no a part and none is held")
                result = result.with_held_a(held[part.piece][lo:hi])  # row views: no copy
            elif result.a is None:
                hint = self._hint(layer, direction)[lo:hi]
            elif collect:
                a = result.a
                got_a[(part.piece, lo)] = a if isinstance(a, PackedRows) else PackedRows.pack(a, self.params.out_bits)
            # in place; pieces of one sum are added (exact: each decrypts to its integer sum)
            t0 = time.perf_counter()
            if state is None:
                decrypt(secret, result, hint=hint, out=out[:, lo:hi], add=pieces > 1)
            else:  # the session's a·s products of this reply part's rows, once per window
                w0, w1 = state.window
                key = (part.piece, lo, hi, result.bits)  # the session's masks of these rows
                if key not in state.outputs:
                    state.outputs[key] = output_masks(secret, result, hint, (w0, w1))
                decrypt_masked(result, state.outputs[key][:, col0 - w0 : col0 - w0 + t], out[:, lo:hi],
                               add=pieces > 1)
            spent["decrypt"] += time.perf_counter() - t0
            filled[0] += hi - lo

        def encrypted(lo: int, hi: int):
            t0 = time.perf_counter()
            if state is None:
                # a streaming transport (the broker client, ByteTransport) encodes every part: packed as encrypted
                batch = encrypt(secret, m[:, lo:hi], a_seed, start=lo, col0=col0, pack=stream is not None)
            else:  # the session's -a·s of every input of the layer, once per window
                w0, w1 = state.window
                if state.inputs is None:
                    state.inputs = input_masks(secret, a_seed, route.width(entry, direction), w0, w1 - w0)
                batch = encrypt_masked(self.params, m[:, lo:hi], state.inputs[lo:hi, :, col0 - w0 : col0 - w0 + t],
                                       col0)
            spent["encrypt"] += time.perf_counter() - t0
            return batch

        if stream is not None:
            parts = (wire.EncryptedRequest(rid=rid, layer=layer, direction=direction, part=p.part, parts=p.parts,
                                           row_start=p.lo, batch=encrypted(p.lo, p.hi),
                                           send_a=held is None, owner=self.owner)
                     for p in plan)  # each encrypted when the transport asks for it
            moved = stream(parts, decrypt_part)
        else:
            request = wire.EncryptedRequest(rid=rid, layer=layer, direction=direction, batch=encrypted(0, m.shape[1]),
                                            send_a=held is None, owner=self.owner)
            reply, moved = self.transport(request)
            decrypt_part(reply)
        if filled[0] != width * pieces:  # the parts are distinct and contiguous (the transport checks): all of them
            raise HeloraError(f"the reply to layer {layer} {direction} has {filled[0]} outputs, not {width * pieces}")
        with self._count_lock:
            self.wire_bytes += moved
            self.requests += 1
            self.server_madds += t * entry.d_in * entry.d_out * self.params.limbs
            self.seconds["encrypt"] += spent["encrypt"]
            self.seconds["decrypt"] += spent["decrypt"]
            self.seconds["linear"] += time.perf_counter() - t_call
            if collect and (layer, direction) not in self._held and sum(a.rows for a in got_a.values()) == width * pieces:
                whole = tuple(PackedRows.concat([got_a[k] for k in sorted(got_a) if k[0] == piece])
                              for piece in range(pieces))  # contiguous: the transport checks
                size = sum(len(w.data) for w in whole)
                if self.held_bytes + size <= self.hold_a_bytes:
                    self._held[(layer, direction)] = whole
                    self.held_bytes += size
        return fold(out, entry.sums(direction))  # exact: integers below 2^63

    def _scratch(self, size: int) -> np.ndarray:
        """``size`` int64 of this thread's buffer for decrypted integers, reused by every request it
        makes (a new array per request is hundreds of MB of fresh pages to fault in): valid until
        the thread's next ``_call``, which ``forward`` and ``backward`` wait for."""
        buf = getattr(self._buffers, "ints", None)
        if buf is None or buf.size < size:
            buf = self._buffers.ints = np.empty(size, dtype=np.int64)
        return buf[:size]

    def _wants_a(self, layer: str, direction: str, width: int) -> bool:
        """Whether to keep this request's reply ``a`` part: none is held yet and it fits the budget."""
        if (layer, direction) in self._held:
            return False
        row = packed_size(self.params.out_bits, self.params.n)
        return self.held_bytes + width * row <= self.hold_a_bytes

    def _hint(self, layer: str, direction: str) -> np.ndarray:
        """The layer's public hint, for replies sent without their ``a`` part (fetched once)."""
        if self._fetch_hint is None:
            raise HeloraError(f"layer {layer}: the server sent no a part and this client has no hints")
        key = (layer, direction)
        if key not in self._hints:
            self._hints[key] = self._fetch_hint(layer, direction, self.owner)
        return self._hints[key]

    def forward(self, group: str, x: np.ndarray) -> np.ndarray:
        e = self._entry(group)
        x = np.asarray(x, dtype=np.float32).reshape(-1, e.d_in)
        out = np.empty((x.shape[0], e.d_out), dtype=np.float32)
        for lo in range(0, x.shape[0], self.params.n):
            xq = quantize_rows(x[lo : lo + self.params.n], self.bits)
            y = self._call(group, "fwd", xq.values, e.a_seed_fwd)
            dequantize_forward(y, xq, e.weight_scale, e.row_sums, out=out[lo : lo + self.params.n])
        return out

    def backward(self, group: str, dy: np.ndarray) -> np.ndarray:
        e = self._entry(group)
        dy = np.asarray(dy, dtype=np.float32).reshape(-1, e.d_out)
        out = np.empty((dy.shape[0], e.d_in), dtype=np.float32)
        for lo in range(0, dy.shape[0], self.params.n):
            gq = quantize_rows(dy[lo : lo + self.params.n], self.bits, col_scale=e.weight_scale)
            z = self._call(group, "bwd", gq.values, e.a_seed_bwd)
            dequantize_backward(z, gq, e.col_sums, out=out[lo : lo + self.params.n])
        return out
