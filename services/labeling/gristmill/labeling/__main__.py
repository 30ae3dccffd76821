"""``python -m gristmill.labeling``: ``run_service`` with the labeling service's app."""

import sys

from gristmill.core.service import run_service
from gristmill.labeling.app import METHOD_SCOPES, SERVICE, build_app
from gristmill.labeling.settings import LabelingSettings


def main() -> int:
    return run_service(SERVICE, LabelingSettings, build_app, method_scopes=METHOD_SCOPES)


if __name__ == "__main__":
    sys.exit(main())
