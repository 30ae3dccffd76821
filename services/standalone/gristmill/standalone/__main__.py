"""``python -m gristmill.standalone``: every service in one process until SIGTERM/SIGINT.

Prints one line ``READY admin=127.0.0.1:50055 registry=... labeling=... training=... serving=... openai=...
console=...`` once all serve (``openai``: serving's OpenAI-compatible HTTP API; ``console``: the web pages), and
``STOPPED`` once a SIGTERM/SIGINT has drained and closed them all (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from gristmill.core.errors import GristmillError
from gristmill.core.logs import setup_logging
from gristmill.core.security import configured_license
from gristmill.core.settings import LicenseSettings, TelemetrySettings, load_settings


async def _serve(data_dir: Path, base_port: int | None, ray_num_cpus: int) -> None:
    from gristmill.standalone.platform import EmbeddedPlatform

    # The licence GRISTMILL_LICENSE_* names, as the networked services read it: an enterprise feature can be
    # tried on the embedded platform (the community edition without a file).
    platform = EmbeddedPlatform(
        data_dir,
        base_port,
        ray_num_cpus=ray_num_cpus,
        telemetry=load_settings(TelemetrySettings),
        license=configured_license(load_settings(LicenseSettings)),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    addresses = await platform.start()
    print("READY " + " ".join(f"{name}={address}" for name, address in addresses.items()), flush=True)
    try:
        await stop.wait()
    finally:
        await platform.stop()
        print("STOPPED", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gristmill-standalone", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path(".data/dev"))
    parser.add_argument("--base-port", type=int, default=None, help="first of four ports (0: any free ports)")
    parser.add_argument("--ray-num-cpus", type=int, default=2)
    parser.add_argument("--log-level", default=os.environ.get("GRISTMILL_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The training service's local Ray runs its core worker inside this process, and Ray's C++ failure-signal
    # handler takes SIGTERM too: it prints a stack trace, then arms a 3 s alarm that abort()s the process in
    # the middle of our graceful shutdown (exit 134, no STOPPED). SIGTERM is not a failure here.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    setup_logging("standalone", args.log_level)
    try:
        asyncio.run(_serve(args.data_dir, args.base_port, args.ray_num_cpus))
    except GristmillError as exc:
        logging.getLogger(__name__).error("cannot start: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
