"""turnd: a STUN/TURN server daemon built on trio."""

__version__ = "0.1.0"
