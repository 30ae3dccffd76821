"""Admin commands: ``orgs`` (create, list, show), ``plans`` (set, show), ``keys`` (create, list, rotate, revoke),
``usage`` and ``license``."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import typer
from google.protobuf.message import Message

from gristmill.api.admin.v1 import admin_pb2 as ad
from gristmill.api.common.v1 import common_pb2
from gristmill.cli.context import state, want_json
from gristmill.cli.options import JSON_OPTION, comma_list, message_from_json_file
from gristmill.cli.output import emit, emit_object, enum_name, fail, message_dict, one_line_errors, when
from gristmill.cli.paging import ALL_OPTION, PAGE_SIZE_OPTION, PAGE_TOKEN_OPTION
from gristmill.cli.replies import show_list, show_one, show_pages
from gristmill.client import Gristmill
from gristmill.client.sdk import SERVICES

keys_app = typer.Typer(help="API keys (the secret is shown once, at creation).", no_args_is_help=True)
orgs_app = typer.Typer(help="Organisations (root organisation admins only, except `show`).", no_args_is_help=True)
plans_app = typer.Typer(help="An organisation's plan: quotas and the prediction rate limit.", no_args_is_help=True)


# --------------------------------------------------------------------------- organisations and plans

USAGE_KINDS = {
    enum_name(name, "USAGE_KIND_"): number
    for name, number in ad.UsageKind.items()
    if number != ad.USAGE_KIND_UNSPECIFIED
}
QUOTA_PERIODS = {
    enum_name(name, "QUOTA_PERIOD_"): number
    for name, number in ad.QuotaPeriod.items()
    if number != ad.QUOTA_PERIOD_UNSPECIFIED
}
QUOTA_SYNTAX = (
    f"expected KIND/PERIOD=LIMIT, e.g. predictions/day=10000, with KIND one of {', '.join(USAGE_KINDS)} "
    f"and PERIOD one of {', '.join(QUOTA_PERIODS)}"
)


def parse_quota(text: str) -> ad.Quota:
    """``predictions/day=10000`` → a ``Quota``; anything else is a usage error naming the syntax."""
    spec, sep, limit_text = text.replace(" ", "").partition("=")
    kind, slash, period = spec.partition("/")
    if not sep or not slash or kind not in USAGE_KINDS or period not in QUOTA_PERIODS:
        fail(f"--quota {text!r}: {QUOTA_SYNTAX}", code=2)
    try:
        limit = float(limit_text)
    except ValueError:
        fail(f"--quota {text!r}: the limit {limit_text!r} is not a number", code=2)
    if not limit >= 0 or limit == float("inf"):
        fail(f"--quota {text!r}: the limit must be a finite number >= 0", code=2)
    return ad.Quota(kind=USAGE_KINDS[kind], period=QUOTA_PERIODS[period], limit=limit)


def quota_names(q: ad.Quota) -> tuple[str, str]:
    """The quota's kind and period as the ``--quota`` syntax names them (``predictions``, ``day``)."""
    kind = enum_name(ad.UsageKind.Name(q.kind), "USAGE_KIND_")
    return kind, enum_name(ad.QuotaPeriod.Name(q.period), "QUOTA_PERIOD_")


def quota_text(q: ad.Quota) -> str:
    kind, period = quota_names(q)
    return f"{kind}/{period}={q.limit:g}"


def plan_from_options(
    *, name: str, quotas: list[str], rate_limit: float | None, burst: int, from_file: Path | None
) -> ad.Plan:
    """A plan from a JSON file (the ``Plan`` message's JSON, as ``plans show --json`` prints it) and/or the
    options; options given on the command line replace the file's values."""
    plan = message_from_json_file(from_file, ad.Plan(), what="a plan") if from_file is not None else ad.Plan()
    if name:
        plan.name = name
    if quotas:
        del plan.quotas[:]
        plan.quotas.extend(parse_quota(q) for q in quotas)
    if rate_limit is not None:
        if rate_limit <= 0:
            plan.ClearField("prediction_rate_limit")  # 0: no rate limit
        else:
            plan.prediction_rate_limit.CopyFrom(ad.RateLimit(requests_per_second=rate_limit, burst=burst))
    elif burst:
        fail("--burst needs --rate-limit", code=2)
    return plan


def plan_fields(plan: ad.Plan) -> dict[str, Any]:
    rate = plan.prediction_rate_limit
    return {
        "plan": plan.name,
        "quotas": ", ".join(quota_text(q) for q in plan.quotas) or "(unlimited)",
        "rate limit": (
            f"{rate.requests_per_second:g}/s burst {rate.burst or max(1, int(rate.requests_per_second))}"
            if plan.HasField("prediction_rate_limit")
            else "(none)"
        ),
    }


def org_row(o: ad.Organization) -> dict[str, Any]:
    return {
        "organization": o.organization_id,
        "name": o.display_name,
        **plan_fields(o.plan),
        "created": when(o.create_time),
    }


PLAN_NAME_OPTION = typer.Option("", "--plan", help="the plan's name for people (free, team, enterprise...)")
QUOTA_OPTION = typer.Option(
    [], "--quota", help="KIND/PERIOD=LIMIT, repeatable: e.g. predictions/day=10000, training-worker-seconds/month=36000"
)
RATE_LIMIT_OPTION = typer.Option(None, "--rate-limit", help="predictions per second (token bucket; 0: no limit)")
BURST_OPTION = typer.Option(0, "--burst", min=0, help="the rate limit's bucket size (0: the rate, at least 1)")
PLAN_FILE_OPTION = typer.Option(None, "--from-file", help="a plan as JSON (what `plans show --json` prints)")
ORGANIZATION_OPTION = typer.Option("", help="organisation (default: the caller's)")
ORGANIZATION_ARGUMENT = typer.Argument("", help="organisation (default: the caller's)")


@orgs_app.command("create")
@one_line_errors
def orgs_create(
    ctx: typer.Context,
    organization_id: str = typer.Argument(..., help="the organisation's id (a slug)"),
    name: str = typer.Option("", "--name", help="display name (default: the id)"),
    plan_name: str = PLAN_NAME_OPTION,
    quotas: list[str] = QUOTA_OPTION,
    rate_limit: float | None = RATE_LIMIT_OPTION,
    burst: int = BURST_OPTION,
    from_file: Path | None = PLAN_FILE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Create an organisation with a plan (no quota given: unlimited). Then `keys create --organization ID`."""
    plan = plan_from_options(name=plan_name, quotas=quotas, rate_limit=rate_limit, burst=burst, from_file=from_file)
    request = ad.CreateOrganizationRequest(
        organization_id=organization_id, display_name=name or organization_id, plan=plan
    )
    show_one(ctx, lambda gm: gm.admin.CreateOrganization(request), org_row, as_json)


@orgs_app.command("list")
@one_line_errors
def orgs_list(
    ctx: typer.Context,
    page_size: int = PAGE_SIZE_OPTION,
    page_token: str = PAGE_TOKEN_OPTION,
    every_page: bool = ALL_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Organisations with their plans (an admin of another organisation sees only their own)."""

    def fetch(gm: Gristmill, page: common_pb2.PageRequest) -> tuple[Sequence[ad.Organization], str]:
        reply = gm.admin.ListOrganizations(ad.ListOrganizationsRequest(page=page))
        return reply.organizations, reply.next_page_token

    show_pages(ctx, fetch, org_row, as_json, page_size=page_size, page_token=page_token, every_page=every_page)


@orgs_app.command("show")
@one_line_errors
def orgs_show(
    ctx: typer.Context,
    organization_id: str = ORGANIZATION_ARGUMENT,
    as_json: bool = JSON_OPTION,
) -> None:
    """One organisation and its plan."""
    request = ad.GetOrganizationRequest(organization_id=organization_id)
    show_one(ctx, lambda gm: gm.admin.GetOrganization(request), org_row, as_json)


@plans_app.command("set")
@one_line_errors
def plans_set(
    ctx: typer.Context,
    organization_id: str = typer.Argument(..., help="organisation whose plan to replace"),
    plan_name: str = typer.Option("", "--name", help="the plan's name for people (free, team, enterprise...)"),
    quotas: list[str] = QUOTA_OPTION,
    rate_limit: float | None = RATE_LIMIT_OPTION,
    burst: int = BURST_OPTION,
    from_file: Path | None = PLAN_FILE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Replace an organisation's plan (it applies from the next call; usage so far this period still counts).

    The plan is replaced as a whole: quotas not given are removed (unlimited).
    """
    if not (plan_name or quotas or rate_limit is not None or from_file):
        fail("give the new plan: --name, --quota, --rate-limit or --from-file (see --help)", code=2)
    plan = plan_from_options(name=plan_name, quotas=quotas, rate_limit=rate_limit, burst=burst, from_file=from_file)
    request = ad.SetOrganizationPlanRequest(organization_id=organization_id, plan=plan)
    show_one(ctx, lambda gm: gm.admin.SetOrganizationPlan(request), org_row, as_json)


@plans_app.command("show")
@one_line_errors
def plans_show(
    ctx: typer.Context,
    organization_id: str = ORGANIZATION_ARGUMENT,
    as_json: bool = JSON_OPTION,
) -> None:
    """An organisation's plan (``--json`` prints it in the form ``plans set --from-file`` reads)."""
    with state(ctx).client() as gm:
        org = gm.admin.GetOrganization(ad.GetOrganizationRequest(organization_id=organization_id))
    emit_object({"organization": org.organization_id, **plan_fields(org.plan)}, want_json(ctx, as_json), raw=org.plan)


# --------------------------------------------------------------------------- API keys


def emit_secret(ctx: typer.Context, fields: dict[str, Any], reply: Message, as_json: bool) -> None:
    """A key with its new secret (shown this one time), and on a terminal a reminder to keep it."""
    emit_object(fields, want_json(ctx, as_json), raw=reply)
    if not want_json(ctx, as_json):
        typer.echo("keep the secret safe: it cannot be shown again", err=True)


def key_row(k: ad.ApiKey) -> dict[str, Any]:
    return {
        "key": k.api_key_id,
        "name": k.display_name,
        "organization": k.organization_id,
        "scopes": ",".join(k.scopes),
        "prefix": k.secret_prefix,
        "created": when(k.create_time),
        "expires": when(k.expire_time) if k.HasField("expire_time") else "",
        "revoked": when(k.revoke_time) if k.HasField("revoke_time") else "",
    }


_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
EXPIRY_SYNTAX = (
    "expected a duration such as 90m, 12h or 30d (s, m, h, d), or an RFC 3339 time such as 2027-01-31T00:00:00Z"
)


def expiry_time(text: str, now: datetime | None = None) -> datetime:
    """``30d`` (from ``now``) or ``2027-01-31T00:00:00Z`` → an aware UTC time in the future; anything else, or a
    time not after ``now``, is a one-line usage error."""
    now = now or datetime.now(UTC)
    match = _DURATION.match(text)
    if match:
        amount, unit = match.groups()
        if int(amount) == 0:
            fail(f"--expires {text!r}: the duration must be more than 0", code=2)
        try:
            return now + timedelta(**{_UNITS[unit]: int(amount)})
        except OverflowError:
            fail(f"--expires {text!r}: too far in the future", code=2)
    try:
        at = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        fail(f"--expires {text!r}: {EXPIRY_SYNTAX}", code=2)
    if at.tzinfo is None:
        fail(f"--expires {text!r}: give the time zone, e.g. {text.strip()}Z", code=2)
    if at <= now:
        fail(f"--expires {text!r}: that time has passed", code=2)
    return at.astimezone(UTC)


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
    organization: str = ORGANIZATION_OPTION,
    expires: str = typer.Option(
        "",
        "--expires",
        help="when the key stops working: after 90m, 12h, 30d... or at an RFC 3339 time (default: never)",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create an API key and print its secret (this one time only)."""
    request = ad.CreateApiKeyRequest(organization_id=organization, display_name=name, scopes=comma_list(scopes))
    if expires:
        request.expire_time.FromDatetime(expiry_time(expires))
    with state(ctx).client() as gm:
        reply = gm.admin.CreateApiKey(request)
    emit_secret(ctx, {**key_row(reply.api_key), "secret": reply.secret}, reply, as_json)


@keys_app.command("list")
@one_line_errors
def keys_list(
    ctx: typer.Context,
    organization: str = ORGANIZATION_OPTION,
    include_revoked: bool = typer.Option(False, "--include-revoked", help="also list revoked keys"),
    as_json: bool = JSON_OPTION,
) -> None:
    """An organisation's keys, newest first (never their secrets)."""
    request = ad.ListApiKeysRequest(organization_id=organization, include_revoked=include_revoked)
    show_list(ctx, lambda gm: gm.admin.ListApiKeys(request).api_keys, key_row, as_json)


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
    emit_secret(ctx, {**key_row(reply.api_key), "secret": reply.secret, "replaces": key_id}, reply, as_json)


@keys_app.command("revoke")
@one_line_errors
def keys_revoke(ctx: typer.Context, key_id: str = typer.Argument(...), as_json: bool = JSON_OPTION) -> None:
    """Revoke a key at once."""
    show_one(ctx, lambda gm: gm.admin.RevokeApiKey(ad.RevokeApiKeyRequest(api_key_id=key_id)), key_row, as_json)


@one_line_errors
def usage_command(
    ctx: typer.Context,
    organization: str = ORGANIZATION_OPTION,
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
        kind, period = quota_names(q.quota)
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
        "key": info.key_id,
        # Never hidden: a development install must be told apart from a production one at a glance.
        "development key": "TRUSTED (development mode)" if info.development_key else "no",
        "expires": when(info.expire_time) if info.HasField("expire_time") else "",
        "features": ",".join(info.features),
        "limits": ",".join(f"{k}={v}" for k, v in sorted(info.limits.items())),
        "message": info.message,
    }
    emit_object(fields, want_json(ctx, as_json), raw=info)
