"""``python -m gristmill.admin``: ``run_service`` with the admin service's app (which also bootstraps the root
organisation and its first admin key on a first start, and re-reads the licence file on SIGHUP)."""

import sys

from gristmill.admin import SERVICE_NAME
from gristmill.admin.api.servicer import METHOD_SCOPES
from gristmill.admin.app import build_app
from gristmill.admin.settings import AdminSettings
from gristmill.core.service import run_service


def main() -> int:
    return run_service(SERVICE_NAME, AdminSettings, build_app, method_scopes=METHOD_SCOPES, local_keys=True)


if __name__ == "__main__":
    sys.exit(main())
