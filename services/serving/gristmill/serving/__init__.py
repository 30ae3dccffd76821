"""Gristmill serving service: deployed text classifiers behind the Open Inference Protocol v2 and a typed Predict.

Layers (see services/README.md): ``__main__`` → ``app`` (wiring) → ``api/`` (thin servicers) → ``domain/``
(deployments, routing, hot-swap, canary, dynamic batching, prediction logging rules) → ``store/`` (deployment
specs) and ``runtime/`` (model sources and the torch/transformers classifier) → ``events/`` (alias-changed
consumer, prediction-logged producer).
"""

__version__ = "0.1.0"
