"""STUN/TURN numbers: methods, classes, attribute types, error codes (RFC 8489, RFC 8656)."""

MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
HEADER_SIZE = 20
FINGERPRINT_XOR = 0x5354554E

# Methods
BINDING = 0x001
ALLOCATE = 0x003
REFRESH = 0x004
SEND = 0x006
DATA = 0x007
CREATE_PERMISSION = 0x008
CHANNEL_BIND = 0x009

METHOD_NAMES = {
    BINDING: "Binding",
    ALLOCATE: "Allocate",
    REFRESH: "Refresh",
    SEND: "Send",
    DATA: "Data",
    CREATE_PERMISSION: "CreatePermission",
    CHANNEL_BIND: "ChannelBind",
}

# Classes
REQUEST = 0b00
INDICATION = 0b01
SUCCESS = 0b10
ERROR = 0b11

# Attribute types: comprehension-required (0x0000-0x7FFF)
MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
CHANNEL_NUMBER = 0x000C
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
DATA_ATTR = 0x0013
REALM = 0x0014
NONCE = 0x0015
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_ADDRESS_FAMILY = 0x0017
EVEN_PORT = 0x0018
REQUESTED_TRANSPORT = 0x0019
DONT_FRAGMENT = 0x001A
MESSAGE_INTEGRITY_SHA256 = 0x001C
PASSWORD_ALGORITHM = 0x001D
USERHASH = 0x001E
XOR_MAPPED_ADDRESS = 0x0020
RESERVATION_TOKEN = 0x0022
PRIORITY = 0x0024  # RFC 8445 (ICE)
USE_CANDIDATE = 0x0025  # RFC 8445 (ICE)
# Comprehension-optional (0x8000-0xFFFF)
PASSWORD_ALGORITHMS = 0x8002
ALTERNATE_DOMAIN = 0x8003
ADDITIONAL_ADDRESS_FAMILY = 0x8000
ADDRESS_ERROR_CODE = 0x8001
# The code point of ADDITIONAL-ADDRESS-FAMILY before RFC 8656, still sent by coturn 4.6 clients.
ADDITIONAL_ADDRESS_FAMILY_DRAFT = 0x8032
ICMP = 0x8004
SOFTWARE = 0x8022
ALTERNATE_SERVER = 0x8023
FINGERPRINT = 0x8028
ICE_CONTROLLED = 0x8029
ICE_CONTROLLING = 0x802A


def comprehension_required(attr_type: int) -> bool:
    return attr_type < 0x8000


# Address families as carried in STUN address attributes
FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

# Password algorithms (RFC 8489 §18.5)
ALGORITHM_MD5 = 0x0001
ALGORITHM_SHA256 = 0x0002

# Transport protocol numbers for REQUESTED-TRANSPORT
TRANSPORT_UDP = 17
TRANSPORT_TCP = 6

# Error codes and their default reason phrases
TRY_ALTERNATE = 300
BAD_REQUEST = 400
UNAUTHORIZED = 401
FORBIDDEN = 403
UNKNOWN_ATTRIBUTE = 420
ALLOCATION_MISMATCH = 437
STALE_NONCE = 438
ADDRESS_FAMILY_NOT_SUPPORTED = 440
WRONG_CREDENTIALS = 441
UNSUPPORTED_TRANSPORT = 442
PEER_ADDRESS_FAMILY_MISMATCH = 443
ALLOCATION_QUOTA_REACHED = 486
SERVER_ERROR = 500
INSUFFICIENT_CAPACITY = 508

REASONS = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthenticated",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    500: "Server Error",
    508: "Insufficient Capacity",
}

# Channel numbers usable for ChannelData (RFC 8656 §12)
CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x4FFF

# Limits from RFC 8489 §14
MAX_USERNAME_BYTES = 512  # "less than 513 bytes"
MAX_TEXT_CHARS = 127  # REALM, NONCE, SOFTWARE, reason: "fewer than 128 characters"
MAX_TEXT_BYTES = 763
# Attributes decoded per message: real clients send at most about 12 (an ICE check with
# its extensions); a 64 KiB message could hold 16,000. A larger count is a 400.
MAX_ATTRIBUTES = 64
