"""The 1.12 wire format: line codec, signals, handshake lines and the control channel."""
