"""``python -m gristmill.registry``: ``run_service`` with the registry's app (which also finishes the
verifications a previous run left PENDING)."""

import sys

from gristmill.core.service import run_service
from gristmill.registry import SERVICE_NAME
from gristmill.registry.app import METHOD_SCOPES, build_app
from gristmill.registry.settings import RegistrySettings


def main() -> int:
    return run_service(SERVICE_NAME, RegistrySettings, build_app, method_scopes=METHOD_SCOPES)


if __name__ == "__main__":
    sys.exit(main())
