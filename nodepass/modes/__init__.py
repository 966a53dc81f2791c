"""The runners of the three modes (single-end, dual-end server and client) and what they share."""
