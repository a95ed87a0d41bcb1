"""Sans-IO protocol state machines: bytes in, events out; events in, bytes out. No sockets, no clocks."""
