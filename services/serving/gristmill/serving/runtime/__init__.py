"""What runs models: model sources (registry + object store, local directory) and the torch classifier."""
