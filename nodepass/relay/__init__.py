"""Moving bytes: the relay core (producers both ways), splice(2), the TLS fast path and UDP sessions."""
