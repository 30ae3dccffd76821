"""``python -m gristmill.admin`` as a process: first start writes the root admin key, SIGTERM exits cleanly,
bad settings stop it with a line naming the variable, and auth can be off only in embedded dev mode (loudly)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from gristmill.api.admin.v1 import admin_pb2 as pb
from gristmill.api.admin.v1 import admin_pb2_grpc as pb_grpc
from gristmill.core.licensing import LicenseClaims, generate_keypair, load_private_key, sign_license
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRISTMILL_", "OTEL_"))}
    env.update(
        GRISTMILL_ADMIN_DATA_DIR=str(tmp_path / "data"),
        GRISTMILL_ADMIN_GRPC_PORT=str(port),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def _start(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gristmill.admin"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _who_am_i(port: int, metadata: tuple[tuple[str, str], ...], deadline_s: float = 30) -> pb.WhoAmIResponse:
    end = time.monotonic() + deadline_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=deadline_s)
        stub = pb_grpc.AdminServiceStub(channel)
        while True:
            try:
                reply: pb.WhoAmIResponse = stub.WhoAmI(pb.WhoAmIRequest(), metadata=metadata, timeout=5)
                return reply
            except grpc.RpcError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.1)


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.stdout is not None
    return proc.stdout.read()


def test_first_start_writes_the_root_key_and_sigterm_exits_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    proc = _start(_env(tmp_path, port))
    try:
        key_file = tmp_path / "data" / "root-admin.key"
        deadline = time.monotonic() + 30
        while not key_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        secret = key_file.read_text().strip()
        reply = _who_am_i(port, (("authorization", f"Bearer {secret}"),))
        assert (reply.organization_id, list(reply.scopes), reply.auth_disabled) == ("default", ["admin"], False)
        with pytest.raises(grpc.RpcError) as err, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            pb_grpc.AdminServiceStub(channel).WhoAmI(pb.WhoAmIRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    finally:
        output = _stop(proc)
    assert "first start: created admin key" in output
    assert secret not in output


def test_auth_off_in_embedded_mode_is_logged_loudly(tmp_path: Path) -> None:
    port = _free_port()
    proc = _start(_env(tmp_path, port, GRISTMILL_AUTH_DISABLED="true"))
    try:
        reply = _who_am_i(port, ())
        assert reply.auth_disabled is True and reply.organization_id == "default"
    finally:
        output = _stop(proc)
    assert "WARNING" in output and "AUTH IS DISABLED for admin" in output


def test_auth_cannot_be_off_with_kafka_and_bad_settings_name_the_variable(tmp_path: Path, kafka_bootstrap: str) -> None:
    env = _env(
        tmp_path, _free_port(), GRISTMILL_AUTH_DISABLED="true", GRISTMILL_KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap
    )
    done = subprocess.run(
        [sys.executable, "-m", "gristmill.admin"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "only in the embedded dev mode" in done.stderr
    env = _env(tmp_path, 0, GRISTMILL_ADMIN_ROOT_ORGANIZATION_ID="Not A Slug")
    done = subprocess.run(
        [sys.executable, "-m", "gristmill.admin"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "GRISTMILL_ADMIN_ROOT_ORGANIZATION_ID='Not A Slug'" in done.stderr


def test_sighup_adopts_a_renewed_licence_and_keeps_the_running_one_over_a_bad_file(tmp_path: Path) -> None:
    private_pem, public_b64 = generate_keypair()
    vendor = load_private_key(private_pem)
    now = datetime.now(UTC)

    def write(license_id: str) -> None:
        claims = LicenseClaims(license_id, "Acme", now - timedelta(days=1), now + timedelta(days=30))
        path.write_bytes(sign_license(claims, vendor))

    def license_id(port: int) -> str:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = pb_grpc.LicenseServiceStub(channel).GetLicense(pb.GetLicenseRequest(), metadata=root, timeout=5)
        return str(info.license_id)

    def wait_for_license(port: int, expected: str) -> None:
        deadline = time.monotonic() + 20
        while license_id(port) != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        assert license_id(port) == expected

    path = tmp_path / "acme.license"
    write("lic-2026")
    port = _free_port()
    proc = _start(_env(tmp_path, port, GRISTMILL_LICENSE_FILE=str(path), GRISTMILL_LICENSE_PUBLIC_KEY=public_b64))
    try:
        key_file = tmp_path / "data" / "root-admin.key"
        deadline = time.monotonic() + 30
        while not key_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        root = (("authorization", f"Bearer {key_file.read_text().strip()}"),)
        _who_am_i(port, root)
        assert license_id(port) == "lic-2026"
        write("lic-2027")  # the renewal
        proc.send_signal(signal.SIGHUP)
        wait_for_license(port, "lic-2027")
        # A tampered file on the next SIGHUP: refused, the running licence stays.
        path.write_bytes(path.read_bytes().replace(b"Acme", b"Acmf"))
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert license_id(port) == "lic-2027" and proc.poll() is None
    finally:
        output = _stop(proc)
    assert "licence reloaded: licence lic-2027" in output
    assert "licence reload refused, keeping the current one" in output
