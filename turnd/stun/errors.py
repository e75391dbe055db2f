"""The two error types of the STUN layer.

``StunDecodeError`` is the only exception any ``*_untrusted`` function raises.
``StunError`` says what to answer: an error code plus any attributes the
error response needs (UNKNOWN-ATTRIBUTES, REALM, NONCE, ...), and, where an
operator should hear of it, a ``note`` saying why.
"""

from __future__ import annotations

from .constants import REASONS


class StunDecodeError(ValueError):
    """Bytes that are not a well-formed STUN message.

    When the 20-byte header was valid (so the bytes were STUN, but an
    attribute was malformed), ``method``, ``cls`` and ``transaction_id`` are
    set, so a server can answer a request with 400 Bad Request.  When they
    are None the bytes were not STUN at all and are dropped silently.
    """

    def __init__(self, reason: str, *, method: int | None = None, cls: int | None = None,
                 transaction_id: bytes | None = None):
        super().__init__(reason)
        self.reason = reason
        self.method = method
        self.cls = cls
        self.transaction_id = transaction_id

    @property
    def is_stun(self) -> bool:
        return self.transaction_id is not None


class StunError(Exception):
    """An error response to send: ``code`` (300-699) and extra attributes."""

    def __init__(self, code: int, reason: str | None = None,
                 attributes: list[tuple[int, object]] | None = None, *,
                 note: tuple[str, str] | None = None):
        self.code = code
        self.reason = reason if reason is not None else REASONS.get(code, "Error")
        self.attributes = list(attributes or [])
        self.note = note  # (kind, text) for the operator's log, never sent: why it was refused
        super().__init__(f"{code} {self.reason}")
