"""One lock around every construction of a Hugging Face transformers model in a process (``model_loading``).

transformers (5.x) disables weight tying while ``from_pretrained`` loads a checkpoint by replacing the class
attribute ``PreTrainedModel.tie_weights`` with a no-op and restoring it afterwards
(``transformers.initialization.no_tie_weights``). That patch is process-wide and not thread-safe: a model built on
another thread meanwhile comes out with untied embeddings, and two overlapping loads can restore the no-op for
good (the second one saved it as "the original"), after which no model in the process ties its input and output
embeddings again, so a tied checkpoint (SmolLM2's, for one) loads with an output layer that is not its
embeddings. Serving, the registry and training build models from worker threads, so every build goes through
``model_loading()``. Seen as a test that passed alone and failed in the full suite.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Re-entrant: a load may build a model inside another (a merged model from a base, a skeleton for inspection).
_LOCK = threading.RLock()


@contextmanager
def model_loading() -> Iterator[None]:
    """Hold while constructing a transformers model (``from_pretrained``, ``from_config``)."""
    with _LOCK:
        yield
