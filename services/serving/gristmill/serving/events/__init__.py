"""Events: the alias-changed consumer (hot-swap) and the prediction-logged producer (through the outbox)."""
