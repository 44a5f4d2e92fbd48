"""Contract 1: the parent<->daemon protocol (messages, sans-IO framing)."""
