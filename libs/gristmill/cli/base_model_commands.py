"""Base model commands: ``base-models`` (import, list): the Hugging Face models training jobs fine-tune from.

``base-models import`` takes a Hugging Face directory (on the registry's host or in the object store) or a GGUF
file (likewise), which the registry de-quantises once into safetensors with its tokenizer and chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as rg
from gristmill.cli.context import state
from gristmill.cli.options import JSON_OPTION
from gristmill.cli.output import enum_name, fail, one_line_errors, when
from gristmill.cli.paging import ALL_OPTION, PAGE_SIZE_OPTION, PAGE_TOKEN_OPTION
from gristmill.cli.replies import show_one, show_pages
from gristmill.client import Gristmill

base_models_app = typer.Typer(
    help="Base models jobs fine-tune from (Hugging Face directories, or GGUF files de-quantised once).",
    no_args_is_help=True,
)


# An import copies a whole model (and a GGUF is de-quantised first: ~25 s for 135 M parameters on two cores,
# minutes for billions): far longer than the default deadline of a call.
IMPORT_TIMEOUT_S = 3600.0


def base_model_row(b: rg.BaseModel) -> dict[str, Any]:
    return {
        "base model": b.name,
        "type": b.model_type,
        "parameters": f"{b.parameter_count / 1e6:.1f}M" if b.parameter_count else "",
        "tasks": ",".join(enum_name(common_pb2.TaskType.Name(t), "TASK_TYPE_") for t in b.tasks),
        "license": b.license,
        "chat template": b.chat_template_sha256[:12],
        "created": when(b.create_time),
    }


def import_request(
    name: str,
    *,
    local_path: str = "",
    object_prefix: str = "",
    gguf: str = "",
    gguf_object_key: str = "",
    license_name: str = "",
    description: str = "",
) -> rg.ImportBaseModelRequest:
    """The ImportBaseModel request for exactly one source; paths on this host are made absolute (the registry
    reads them only in the embedded and local modes, where it runs on this host)."""
    sources = {
        "--local-path": local_path,
        "--object-prefix": object_prefix,
        "--gguf": gguf,
        "--gguf-object-key": gguf_object_key,
    }
    if sum(bool(v) for v in sources.values()) != 1:
        fail(f"give exactly one of {', '.join(sources)}", code=2)
    request = rg.ImportBaseModelRequest(name=name, license=license_name, description=description)
    if local_path:
        request.local_path = str(Path(local_path).expanduser().absolute())
    elif object_prefix:
        request.object_prefix = object_prefix
    elif gguf:
        request.gguf_file = str(Path(gguf).expanduser().absolute())
    else:
        request.gguf_object_key = gguf_object_key
    return request


@base_models_app.command("import")
@one_line_errors
def base_models_import(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="name jobs use (--base-model-name), a slug"),
    local_path: str = typer.Option("", "--local-path", help="a Hugging Face directory on the registry's host"),
    object_prefix: str = typer.Option("", "--object-prefix", help="a Hugging Face directory in the object store"),
    gguf: str = typer.Option(
        "", "--gguf", metavar="FILE", help="a GGUF file on the registry's host (de-quantised once to safetensors)"
    ),
    gguf_object_key: str = typer.Option("", "--gguf-object-key", help="a GGUF file in the object store, by key"),
    license_name: str = typer.Option("", "--license", help="licence of the weights (SPDX id or text)"),
    description: str = typer.Option("", help="free text"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Import a base model: a Hugging Face directory (validated and copied with checksums) or a GGUF file
    (de-quantised into safetensors with its tokenizer and chat template, then stored the same way)."""
    request = import_request(
        name,
        local_path=local_path,
        object_prefix=object_prefix,
        gguf=gguf,
        gguf_object_key=gguf_object_key,
        license_name=license_name,
        description=description,
    )
    timeout = max(state(ctx).timeout_s, IMPORT_TIMEOUT_S)
    show_one(ctx, lambda gm: gm.registry.ImportBaseModel(request, timeout=timeout), base_model_row, as_json)


@base_models_app.command("list")
@one_line_errors
def base_models_list(
    ctx: typer.Context,
    page_size: int = PAGE_SIZE_OPTION,
    page_token: str = PAGE_TOKEN_OPTION,
    every_page: bool = ALL_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Base models, by name."""

    def fetch(gm: Gristmill, page: common_pb2.PageRequest) -> tuple[Sequence[rg.BaseModel], str]:
        reply = gm.registry.ListBaseModels(rg.ListBaseModelsRequest(page=page))
        return reply.base_models, reply.next_page_token

    show_pages(ctx, fetch, base_model_row, as_json, page_size=page_size, page_token=page_token, every_page=every_page)
