"""The TURN core (RFC 8656), sans-I/O: no trio, no socket, no clock."""
