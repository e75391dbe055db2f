"""The STUN codec (RFC 8489), sans-I/O: no trio, no socket, no clock."""

from . import constants
from .attributes import AddressErrorCode, ErrorCode, Icmp, PasswordAlgorithm
from .errors import StunDecodeError, StunError
from .integrity import (long_term_key, opaque_string, saslprep, userhash, verify_fingerprint,
                        verify_integrity)
from .message import Message, decode_untrusted, encode

__all__ = [
    "constants", "AddressErrorCode", "ErrorCode", "Icmp", "PasswordAlgorithm",
    "StunDecodeError", "StunError", "long_term_key", "opaque_string", "saslprep", "userhash",
    "verify_fingerprint", "verify_integrity", "Message", "decode_untrusted", "encode",
]
