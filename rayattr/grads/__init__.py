"""Per-example gradient capture, projection and (later) normalization; plain torch, no Ray."""
