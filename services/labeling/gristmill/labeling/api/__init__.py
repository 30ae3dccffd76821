"""gRPC adapter: the thin servicer and the proto ↔ domain conversions."""
