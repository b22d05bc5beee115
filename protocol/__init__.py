"""loomnet.protocol — sans-IO schemas, encoding, signing, framing and stream rules."""
