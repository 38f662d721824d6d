"""The error reply: any service tells a request's sender why it failed, in the wire's discipline
(``messages`` encodes and decodes it with the others: ``encode_error``, ``decode_error``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import HeloraError
from .codec import check_blob as _blob
from .codec import check_text as _text
from .codec import fail as _fail
from .fields import LIB_VERSION, MAX_ERROR_CHARS, MAX_LIB_CHARS, MAX_NAME_CHARS, RID_BYTES


@dataclass(frozen=True)
class ErrorReply:
    """Any service → the sender: why a request failed (``reason`` as in ``errors.py``).

    ``pset`` is carried as text and not resolved: an error must stay readable even when it
    reports an unknown parameter set. Build it with ``from_exception``.
    """

    TYPE: ClassVar[str] = "error"
    rid: bytes
    reason: str
    message: str
    pset: str = ""
    lib: str = LIB_VERSION

    def __post_init__(self) -> None:
        _blob("rid", self.rid, RID_BYTES)
        reason = _text("reason", self.reason, 64)
        if not all(c.isascii() and (c.islower() or c.isdigit() or c == "_") for c in reason):
            _fail("reason", "lowercase letters, digits and '_' only")
        _text("message", self.message, MAX_ERROR_CHARS, empty=True)
        _text("pset", self.pset, MAX_NAME_CHARS, empty=True)
        _text("lib", self.lib, MAX_LIB_CHARS)

    @classmethod
    def from_exception(cls, rid: bytes, exc: BaseException, pset: str = "") -> ErrorReply:
        """helora's errors keep their text (they never hold payload); others only their class."""
        if isinstance(exc, HeloraError):
            return cls(rid, exc.reason, str(exc)[:MAX_ERROR_CHARS], pset)
        return cls(rid, "internal", type(exc).__name__, pset)

    def _body(self) -> dict[str, Any]:
        return {"reason": self.reason, "message": self.message}

    @classmethod
    def _from(cls, m: dict[str, Any], pset: str, max_bytes: int) -> ErrorReply:
        return cls(m["rid"], m["reason"], m["message"], pset, m["lib"])
