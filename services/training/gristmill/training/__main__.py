"""``python -m gristmill.training``: ``run_service`` with the training service's app."""

import os
import sys

from gristmill.core.service import run_service
from gristmill.training import SERVICE_NAME
from gristmill.training.settings import TrainingSettings


def main() -> int:
    # No model hub is reachable or needed: base models are local directories or object-store prefixes.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Ray's C++ failure-signal handler takes SIGTERM and aborts the process mid-shutdown; the service handles
    # SIGTERM itself (drain, then stop Ray). Both before the service's modules import transformers or Ray.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    from gristmill.training.app import METHOD_SCOPES, build_app

    return run_service(SERVICE_NAME, TrainingSettings, build_app, method_scopes=METHOD_SCOPES)


if __name__ == "__main__":
    sys.exit(main())
