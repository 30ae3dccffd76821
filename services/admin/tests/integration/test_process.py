"""``python -m gristmill.admin`` as a process: first start writes the root admin key, SIGTERM exits cleanly,
bad settings stop it with a line naming the variable, and auth can be off only in embedded dev mode (loudly);
a licence signed with a key the release does not trust stops it, a development key is trusted loudly."""

from __future__ import annotations

import os
import re
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
from gristmill.core.licensing import DEVELOPMENT_KEY_WARNING, LicenseClaims, generate_keypair
from tests.conftest import REPO_ROOT
from tests.support.licences import TEST_KEY_B64, signed_license_file

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


def _refused_at_start(env: dict[str, str]) -> str:
    """The one line a process that refuses to start prints (exit status 2)."""
    done = subprocess.run(
        [sys.executable, "-m", "gristmill.admin"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    return done.stderr


def test_a_licence_the_release_does_not_trust_and_the_old_key_setting_stop_it_at_start(tmp_path: Path) -> None:
    # A key pair of the customer's own, and a licence signed with it: the default install refuses it.
    path = signed_license_file(tmp_path / "own.license", key_id="acme-own")
    stderr = _refused_at_start(_env(tmp_path, _free_port(), GRISTMILL_LICENSE_FILE=str(path)))
    assert "licence lic-test is signed with key 'acme-own', which this release does not trust; " in stderr
    # The previous release's setting is never silently ignored, nor trusted.
    _, public_b64 = generate_keypair()
    stderr = _refused_at_start(
        _env(tmp_path, _free_port(), GRISTMILL_LICENSE_FILE=str(path), GRISTMILL_LICENSE_PUBLIC_KEY=public_b64)
    )
    assert "GRISTMILL_LICENSE_PUBLIC_KEY is no longer read" in stderr
    assert "set GRISTMILL_LICENSE_DEVELOPMENT_KEY instead" in stderr


def test_sighup_adopts_a_renewed_licence_and_keeps_the_running_one_over_a_bad_file(tmp_path: Path) -> None:
    # Signed with the test key as a development licence: trusted through the development mode, loudly.
    now = datetime.now(UTC)

    def write(license_id: str) -> None:
        claims = LicenseClaims(license_id, "Acme", now - timedelta(days=1), now + timedelta(days=30))
        signed_license_file(path, claims)

    def license_info(port: int) -> pb.LicenseInfo:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info: pb.LicenseInfo = pb_grpc.LicenseServiceStub(channel).GetLicense(
                pb.GetLicenseRequest(), metadata=root, timeout=5
            )
        return info

    def license_id(port: int) -> str:
        return str(license_info(port).license_id)

    def wait_for_license(port: int, expected: str) -> None:
        deadline = time.monotonic() + 20
        while license_id(port) != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        assert license_id(port) == expected

    path = tmp_path / "acme.license"
    write("lic-2026")
    port = _free_port()
    proc = _start(
        _env(tmp_path, port, GRISTMILL_LICENSE_FILE=str(path), GRISTMILL_LICENSE_DEVELOPMENT_KEY=TEST_KEY_B64)
    )
    try:
        key_file = tmp_path / "data" / "root-admin.key"
        deadline = time.monotonic() + 30
        while not key_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        root = (("authorization", f"Bearer {key_file.read_text().strip()}"),)
        _who_am_i(port, root)
        info = license_info(port)
        assert (info.license_id, info.key_id, info.development_key) == ("lic-2026", "development", True)
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
    assert re.search(rf"WARNING admin .*gristmill\.core\.licensing: {re.escape(DEVELOPMENT_KEY_WARNING)}", output)
    assert "licence reload refused, keeping the current one" in output
