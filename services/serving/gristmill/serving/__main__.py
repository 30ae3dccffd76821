"""``python -m gristmill.serving``: ``run_service`` with the serving service's app."""

import sys

from gristmill.core.service import run_service
from gristmill.serving.app import METHOD_SCOPES, PUBLIC_METHODS, SERVICE, build_app
from gristmill.serving.settings import ServingSettings


def configure_process(settings: ServingSettings) -> None:
    # Imported only here: torch takes seconds and hundreds of MB to import.
    from gristmill.serving.runtime.threads import configure_torch

    configure_torch(settings.torch_threads)


def main() -> int:
    return run_service(
        SERVICE,
        ServingSettings,
        build_app,
        method_scopes=METHOD_SCOPES,
        public=PUBLIC_METHODS,
        prepare=configure_process,
    )


if __name__ == "__main__":
    sys.exit(main())
