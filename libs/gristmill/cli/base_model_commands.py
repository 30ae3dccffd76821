"""Base model commands: ``base-models`` (import, list): the Hugging Face models training jobs fine-tune from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import typer

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2 as rg
from gristmill.cli.options import JSON_OPTION
from gristmill.cli.output import enum_name, fail, one_line_errors, when
from gristmill.cli.paging import ALL_OPTION, PAGE_SIZE_OPTION, PAGE_TOKEN_OPTION
from gristmill.cli.replies import show_one, show_pages
from gristmill.client import Gristmill

base_models_app = typer.Typer(help="Base models jobs fine-tune from (Hugging Face directories).", no_args_is_help=True)


def base_model_row(b: rg.BaseModel) -> dict[str, Any]:
    return {
        "base model": b.name,
        "type": b.model_type,
        "parameters": f"{b.parameter_count / 1e6:.1f}M" if b.parameter_count else "",
        "tasks": ",".join(enum_name(common_pb2.TaskType.Name(t), "TASK_TYPE_") for t in b.tasks),
        "license": b.license,
        "created": when(b.create_time),
    }


@base_models_app.command("import")
@one_line_errors
def base_models_import(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="name jobs use (--base-model-name), a slug"),
    local_path: str = typer.Option("", "--local-path", help="a Hugging Face directory on the registry's host"),
    object_prefix: str = typer.Option("", "--object-prefix", help="a Hugging Face directory in the object store"),
    license_name: str = typer.Option("", "--license", help="licence of the weights (SPDX id or text)"),
    description: str = typer.Option("", help="free text"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Import a Hugging Face model directory as a base model (validated and copied with checksums)."""
    if bool(local_path) == bool(object_prefix):
        fail("give exactly one of --local-path or --object-prefix", code=2)
    request = rg.ImportBaseModelRequest(name=name, license=license_name, description=description)
    if local_path:
        request.local_path = local_path
    else:
        request.object_prefix = object_prefix
    show_one(ctx, lambda gm: gm.registry.ImportBaseModel(request), base_model_row, as_json)


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
