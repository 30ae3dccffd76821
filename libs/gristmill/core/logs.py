"""Process-wide logging: one line per record, with the service name and the current trace id.

Called once by a service's ``__main__``; libraries only ever call ``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import logging
import sys

from gristmill.core.telemetry import current_trace_id


class _TraceIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.trace_id = current_trace_id() or "-"
        return True


def setup_logging(service: str, level: str = "INFO") -> None:
    """Log to stderr as ``time level service trace=<id> logger: message``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_TraceIdFilter())
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {service} trace=%(trace_id)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kafka-python logs every reconnect attempt at INFO/WARNING; the bus reports outages itself.
    logging.getLogger("kafka").setLevel(logging.ERROR)
