"""Network helpers the tunnel layers share: TLS credentials and verification, target dialing and DNS."""
