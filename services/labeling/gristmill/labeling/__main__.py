"""``python -m gristmill.labeling``: ``run_service`` with the labeling service's host."""

import sys

from gristmill.core.service import run_service
from gristmill.labeling.app import METHOD_SCOPES, SERVICE, build_host
from gristmill.labeling.settings import LabelingSettings


def main() -> int:
    return run_service(SERVICE, LabelingSettings, build_host, method_scopes=METHOD_SCOPES)


if __name__ == "__main__":
    sys.exit(main())
