"""Pool transports behind one interface: the TCP pool and the QUIC pool."""
