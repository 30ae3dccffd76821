"""Admin commands: ``keys`` (create, list, rotate, revoke), ``usage`` and ``license``."""

from __future__ import annotations

import json
from typing import Any

import typer

from gristmill.api.admin.v1 import admin_pb2 as ad
from gristmill.cli.context import state, want_json
from gristmill.cli.output import emit, emit_messages, emit_object, enum_name, message_dict, one_line_errors, when
from gristmill.client.sdk import SERVICES

JSON_OPTION = typer.Option(False, "--json", help="print JSON")

keys_app = typer.Typer(help="API keys (the secret is shown once, at creation).", no_args_is_help=True)


def key_row(k: ad.ApiKey) -> dict[str, Any]:
    return {
        "key": k.api_key_id,
        "name": k.display_name,
        "organization": k.organization_id,
        "scopes": ",".join(k.scopes),
        "prefix": k.secret_prefix,
        "created": when(k.create_time),
        "revoked": when(k.revoke_time) if k.HasField("revoke_time") else "",
    }


@keys_app.command("create")
@one_line_errors
def keys_create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="a name people recognise the key by"),
    scopes: str = typer.Option(
        ...,
        help="comma-separated: labeling:read, labeling:write, training:submit, registry:read, "
        "registry:promote, serving:predict, admin",
    ),
    organization: str = typer.Option("", help="organisation (default: the caller's)"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create an API key and print its secret (this one time only)."""
    with state(ctx).client() as gm:
        reply = gm.admin.CreateApiKey(
            ad.CreateApiKeyRequest(
                organization_id=organization,
                display_name=name,
                scopes=[s.strip() for s in scopes.split(",") if s.strip()],
            )
        )
    fields = {**key_row(reply.api_key), "secret": reply.secret}
    emit_object(fields, want_json(ctx, as_json), raw=reply)
    if not want_json(ctx, as_json):
        typer.echo("keep the secret safe: it cannot be shown again", err=True)


@keys_app.command("list")
@one_line_errors
def keys_list(
    ctx: typer.Context,
    organization: str = typer.Option("", help="organisation (default: the caller's)"),
    include_revoked: bool = typer.Option(False, "--include-revoked", help="also list revoked keys"),
    as_json: bool = JSON_OPTION,
) -> None:
    """An organisation's keys, newest first (never their secrets)."""
    with state(ctx).client() as gm:
        reply = gm.admin.ListApiKeys(
            ad.ListApiKeysRequest(organization_id=organization, include_revoked=include_revoked)
        )
    emit_messages(reply.api_keys, key_row, want_json(ctx, as_json))


@keys_app.command("rotate")
@one_line_errors
def keys_rotate(
    ctx: typer.Context,
    key_id: str = typer.Argument(...),
    grace_seconds: int = typer.Option(0, "--grace-seconds", help="how long the old secret keeps working (0: not)"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Replace a key's secret (same organisation and scopes) and print the new one, this one time only."""
    request = ad.RotateApiKeyRequest(api_key_id=key_id)
    if grace_seconds:
        request.grace_period.FromSeconds(grace_seconds)
    with state(ctx).client() as gm:
        reply = gm.admin.RotateApiKey(request)
    fields = {**key_row(reply.api_key), "secret": reply.secret, "replaces": key_id}
    emit_object(fields, want_json(ctx, as_json), raw=reply)
    if not want_json(ctx, as_json):
        typer.echo("keep the secret safe: it cannot be shown again", err=True)


@keys_app.command("revoke")
@one_line_errors
def keys_revoke(ctx: typer.Context, key_id: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """Revoke a key at once."""
    with state(ctx).client() as gm:
        key = gm.admin.RevokeApiKey(ad.RevokeApiKeyRequest(api_key_id=key_id))
    emit_object(key_row(key), want_json(ctx, as_json), raw=key)


@one_line_errors
def usage_command(
    ctx: typer.Context,
    organization: str = typer.Option("", help="organisation (default: the caller's)"),
    by_key: bool = typer.Option(False, "--by-key", help="one total per API key"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Usage this month (predictions, input tokens, training worker-seconds) and the plan's quotas."""
    with state(ctx).client() as gm:
        usage = gm.metering.GetUsage(ad.GetUsageRequest(organization_id=organization, group_by_api_key=by_key))
        quotas = gm.metering.GetQuotaStatus(ad.GetQuotaStatusRequest(organization_id=organization))
    rows: list[dict[str, Any]] = [
        {
            "kind": enum_name(ad.UsageKind.Name(t.kind), "USAGE_KIND_"),
            **({"key": t.api_key_id} if by_key else {}),
            "quantity": round(t.quantity, 3),
            "from": when(t.period_start),
            "to": when(t.period_end),
        }
        for t in usage.totals
    ]
    if want_json(ctx, as_json):
        typer.echo(json.dumps({"usage": message_dict(usage), "quotas": message_dict(quotas)}, indent=2))
        return
    emit(rows, False)
    for q in quotas.quotas:
        kind = enum_name(ad.UsageKind.Name(q.quota.kind), "USAGE_KIND_")
        period = enum_name(ad.QuotaPeriod.Name(q.quota.period), "QUOTA_PERIOD_")
        typer.echo(f"quota {kind} per {period}: {q.used:g} used, {q.remaining:g} left of {q.quota.limit:g}")


@one_line_errors
def license_command(
    ctx: typer.Context,
    service: str = typer.Option("admin", help="which service to ask (each verified the licence at its start)"),
    as_json: bool = JSON_OPTION,
) -> None:
    """The licence a service runs under: edition, state, features and limits (never the signature)."""
    if service not in SERVICES:
        raise typer.BadParameter(f"choose from {', '.join(SERVICES)}", param_hint="--service")
    with state(ctx).client() as gm:
        info = gm.license(service).GetLicense(ad.GetLicenseRequest())
    fields = {
        "service": info.service,
        "state": enum_name(ad.LicenseState.Name(info.state), "LICENSE_STATE_"),
        "license": info.license_id or "community edition",
        "customer": info.customer,
        "expires": when(info.expire_time) if info.HasField("expire_time") else "",
        "features": ",".join(info.features),
        "limits": ",".join(f"{k}={v}" for k, v in sorted(info.limits.items())),
        "message": info.message,
    }
    emit_object(fields, want_json(ctx, as_json), raw=info)
