from __future__ import annotations

import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from gristmill.core.logs import setup_logging


def test_log_lines_carry_service_and_trace_id(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("labeling", "INFO")
        tracer = TracerProvider().get_tracer("test")
        with tracer.start_as_current_span("op") as span:
            logging.getLogger("gristmill.test").info("inside")
            trace_id = format(span.get_span_context().trace_id, "032x")
        logging.getLogger("gristmill.test").info("outside")
        err = capsys.readouterr().err.splitlines()
        assert f"INFO labeling trace={trace_id} gristmill.test: inside" in err[0]
        assert "INFO labeling trace=- gristmill.test: outside" in err[1]
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
