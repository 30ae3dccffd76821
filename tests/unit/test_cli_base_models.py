"""``gristmill base-models import`` without a platform: each source option becomes the request's one source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from gristmill.api.registry.v1 import registry_pb2 as rg
from gristmill.cli import base_model_commands
from gristmill.cli.base_model_commands import base_model_row, import_request
from gristmill.cli.main import app


def test_each_source_option_sets_its_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    gguf = import_request("smol", gguf="models/smol.Q4_1.gguf", license_name="apache-2.0")
    assert gguf.WhichOneof("source") == "gguf_file"
    assert gguf.gguf_file == str(tmp_path / "models" / "smol.Q4_1.gguf")  # the registry needs absolute paths
    assert (gguf.name, gguf.license) == ("smol", "apache-2.0")
    keyed = import_request("smol", gguf_object_key="uploads/smol.gguf")
    assert (keyed.WhichOneof("source"), keyed.gguf_object_key) == ("gguf_object_key", "uploads/smol.gguf")
    assert import_request("m", local_path="/models/minilm").local_path == "/models/minilm"
    assert import_request("m", object_prefix="uploads/minilm").object_prefix == "uploads/minilm"
    for sources in ({}, {"gguf": "a.gguf", "local_path": "/models/minilm"}):
        with pytest.raises(typer.Exit) as refused:
            import_request("m", **sources)
        assert refused.value.exit_code == 2


def test_the_command_sends_the_gguf_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[rg.ImportBaseModelRequest] = []
    timeouts: list[float] = []

    class Registry:
        def ImportBaseModel(self, request: rg.ImportBaseModelRequest, timeout: float) -> rg.BaseModel:
            sent.append(request)
            timeouts.append(timeout)
            return rg.BaseModel(name=request.name, chat_template_sha256="ab" * 32)

    class Client:
        registry = Registry()

    shown: list[dict[str, Any]] = []

    def show_one(ctx: Any, call: Any, fields: Any, as_json: bool) -> None:
        shown.append(fields(call(Client())))

    monkeypatch.setattr(base_model_commands, "show_one", show_one)
    source = tmp_path / "smol.gguf"
    result = CliRunner().invoke(app, ["base-models", "import", "smol", "--gguf", str(source), "--license", "mit"])
    assert result.exit_code == 0, result.output
    assert [(r.name, r.gguf_file, r.license) for r in sent] == [("smol", str(source), "mit")]
    assert timeouts == [base_model_commands.IMPORT_TIMEOUT_S]  # de-quantising takes longer than a call's default
    assert shown[0]["chat template"] == "ab" * 6
    result = CliRunner().invoke(app, ["base-models", "import", "smol", "--gguf", "a", "--gguf-object-key", "b"])
    assert result.exit_code == 2 and "exactly one of --local-path, --object-prefix, --gguf" in result.output
    assert len(sent) == 1


def test_the_row_shows_a_short_template_hash() -> None:
    assert base_model_row(rg.BaseModel(name="m"))["chat template"] == ""
