"""One lock around every construction of a Hugging Face transformers model in a process (``model_loading``).

transformers (5.x) disables weight tying while ``from_pretrained`` loads a checkpoint by replacing the class
attribute ``PreTrainedModel.tie_weights`` with a no-op and restoring it afterwards
(``transformers.initialization.no_tie_weights``). That patch is process-wide and not thread-safe: a model built on
another thread meanwhile comes out with untied embeddings, and two overlapping loads can restore the no-op for
good (the second one saved it as "the original"), after which no model in the process ties its input and output
embeddings again, so a tied checkpoint (SmolLM2's, for one) loads with an output layer that is not its
embeddings. Serving, the registry and training build models from worker threads, so every build goes through
``model_loading()``. Seen as a test that passed alone and failed in the full suite.

It also turns transformers' Hub kernels off unless the operator turned them on (``USE_HUB_KERNELS``): since 5.x,
``from_pretrained`` on a CUDA device swaps layers (rotary embeddings, ...) for kernels it downloads from the Hub at
load time, and fails when the Hub is unreachable ("... not available in the local cache and Hugging Face Hub is in
offline mode"), or when the ``kernels`` package is missing ("Kernels are not available"). Self-hosted installs run
without the Hub, and code fetched while a model loads is not what the operator deployed. Seen on the first GPU run
of the SFT benchmark: every CUDA load failed; CPU loads never ask for kernels, so no test here saw it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Re-entrant: a load may build a model inside another (a merged model from a base, a skeleton for inspection).
_LOCK = threading.RLock()


@contextmanager
def model_loading() -> Iterator[None]:
    """Hold while constructing a transformers model (``from_pretrained``, ``from_config``)."""
    hub_kernels_off()
    with _LOCK:
        yield


def hub_kernels_off() -> None:
    """No Hub kernels for transformers' loads in this process, unless ``USE_HUB_KERNELS`` was set (the operator's
    choice stands). transformers reads the variable at every ``from_pretrained``."""
    os.environ.setdefault("USE_HUB_KERNELS", "0")
