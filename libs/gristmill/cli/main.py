"""``gristmill``: run the platform and drive it from a terminal.

Every command talks to the services over gRPC (``gristmill.client``). Output is a human-readable table by
default and JSON with ``--json``; an error is one line on stderr and a non-zero exit status.

Where the services are: every service on its default port on 127.0.0.1, unless ``--host`` (all on one host),
``--endpoints "labeling=h:p training=h:p ..."`` (the embedded platform's READY line) or one service's option
(``--labeling h:p`` ...) say otherwise. ``--api-key`` (or ``GRISTMILL_API_KEY``) is sent with every call.
With ``GRISTMILL_TLS_CERT_FILE`` / ``_KEY_FILE`` / ``_CA_FILE`` set, every call (health checks too) is made over
mTLS with that client certificate; a refused handshake is reported in one line saying which side refused and why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# Before grpc loads: its core would otherwise print its own INFO lines (a failed TLS handshake, say) on stderr,
# around the one line a command prints for an error. GRPC_VERBOSITY given by the caller wins; the services this
# process starts inherit it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import typer

from gristmill.cli import (
    admin_commands,
    annotation_commands,
    base_model_commands,
    labeling_commands,
    registry_commands,
    serving_commands,
    training_commands,
)
from gristmill.cli.context import build_state
from gristmill.cli.demo_command import demo_command, run_dir
from gristmill.cli.output import emit, fail, one_line_errors
from gristmill.cli.platforms import SERVICE_BASE_ENV, LocalStack, serving_replica_addresses
from gristmill.cli.processes import health
from gristmill.core.ports import MAX_SERVING_REPLICAS, OPENAI_HTTP_PORT_OFFSET
from gristmill.core.ports import SERVING_REPLICA_PORT_STEP as REPLICA_STEP
from gristmill.core.tls import diagnose_handshake, tls_files

app = typer.Typer(
    help="Gristmill: label → train → register → serve, on your own machines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main_options(
    ctx: typer.Context,
    host: str = typer.Option("", envvar="GRISTMILL_HOST", help="every service on this host, default ports"),
    endpoints: str = typer.Option(
        "", envvar="GRISTMILL_ENDPOINTS", help="'labeling=h:p training=h:p registry=h:p serving=h:p admin=h:p'"
    ),
    labeling: str = typer.Option("", help="labeling service host:port (replicas: h1:p,h2:p, called round-robin)"),
    training: str = typer.Option("", help="training service host:port"),
    registry: str = typer.Option("", help="registry host:port (replicas: h1:p,h2:p)"),
    serving: str = typer.Option("", help="serving service host:port (replicas: h1:p,h2:p, called round-robin)"),
    admin: str = typer.Option("", help="admin service host:port"),
    api_key: str = typer.Option("", envvar="GRISTMILL_API_KEY", help="API key sent with every call"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    timeout: float = typer.Option(30.0, help="seconds each call may take"),
) -> None:
    ctx.obj = build_state(
        host=host,
        endpoints=endpoints,
        overrides={
            "labeling": labeling,
            "training": training,
            "registry": registry,
            "serving": serving,
            "admin": admin,
        },
        api_key=api_key,
        as_json=as_json,
        timeout_s=timeout,
    )


# --------------------------------------------------------------------------- running the platform


def local_stack(base_port: int = 0, services_dir: Path | None = None) -> LocalStack:
    return LocalStack(run_dir(services_dir), base_port=base_port)


RUN_DIR_OPTION = typer.Option(None, "--run-dir", help="the services' pid files, logs and data (default .run)")


@app.command()
@one_line_errors
def up(
    timeout: float = typer.Option(180.0, help="seconds to wait for the services"),
    base_port: int = typer.Option(0, min=0, max=65529, help="first service port (0: the default ports)"),
    services_dir: Path | None = RUN_DIR_OPTION,
    group_suffix: str = typer.Option(
        "", help="suffix for every consumer group: an installation of its own on a shared Kafka (starts at the end)"
    ),
    serving_replicas: int = typer.Option(
        1,
        min=1,
        max=MAX_SERVING_REPLICAS + 1,
        help=f"serving processes sharing one deployment store (replica k on the serving port + {REPLICA_STEP}k)",
    ),
    tls: bool = typer.Option(
        False, "--tls", help="mTLS everywhere: each service its own certificate from <run dir>/certs (made if missing)"
    ),
) -> None:
    """Start the local stack: Kafka, the S3 server, and each service (admin too) as its own process."""
    stack = LocalStack(
        run_dir(services_dir),
        base_port=base_port,
        group_suffix=group_suffix,
        serving_replicas=serving_replicas,
        tls=tls,
    )
    stack.start_infrastructure()
    stack.create_topics()
    stack.start_groups_at_end()
    stack.start(timeout, on_start=lambda proc, pid: typer.echo(f"{proc.name}: pid {pid}, log {proc.log_file}"))
    for name, address in {**vars(stack.endpoints), **stack.replica_endpoints()}.items():
        typer.echo(f"{name}: serving on {address}")
        if name.startswith("serving"):
            host, port = address.rsplit(":", 1)
            # Each serving process serves the OpenAI-compatible HTTP API beside its gRPC port (ServingSettings).
            typer.echo(f"{name}: OpenAI-compatible API on http://{host}:{int(port) + OPENAI_HTTP_PORT_OFFSET}/v1")
    typer.echo(f"console: {stack.console_url} (sign in with an API key)")
    key = stack.root_key_file()
    if key.exists():
        typer.echo(f"root API key (admin scope) is in {key}: export GRISTMILL_API_KEY=$(cat {key})")
    if tls:
        exports = " ".join(f"{k}={v}" for k, v in tls_files(stack.certs_dir, "client").items())
        typer.echo(f"mTLS is on; the CLI and the SDK call with the client certificate: export {exports}")


@app.command()
@one_line_errors
def down(
    keep_stack: bool = typer.Option(False, help="stop the services but leave Kafka and S3 running"),
    base_port: int = typer.Option(0, min=0, max=65529, help="as given to `up`"),
    services_dir: Path | None = RUN_DIR_OPTION,
) -> None:
    """Stop the services (they drain in-flight calls), then Kafka and the S3 server."""
    stack = local_stack(base_port, services_dir)
    for name, was_running in stack.stop():
        typer.echo(f"{name}: {'stopped' if was_running else 'not running'}")
    if not keep_stack:
        script = Path(__file__).resolve().parents[3] / "deploy" / "local" / "stack.sh"
        if not script.exists():
            fail("this command needs a source checkout of Gristmill (deploy/local/stack.sh is missing)")
        subprocess.run([str(script), "down"], check=True)


@app.command()
@one_line_errors
def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    serving_replicas: int = typer.Option(
        1, min=1, max=MAX_SERVING_REPLICAS + 1, help="as given to `up`: the serving replicas beyond the first too"
    ),
) -> None:
    """Health of each service (at the addresses the global options give), and of the serving replicas."""
    from gristmill.cli.context import state

    cli = state(ctx)
    endpoints = vars(cli.endpoints)
    endpoints |= serving_replica_addresses(endpoints["serving"], serving_replicas)
    rows = [
        {"service": name, "address": address, "health": health(address, tls=cli.tls)}
        for name, address in endpoints.items()
    ]
    emit(rows, as_json or cli.as_json)
    # A service that is up but refuses our handshake (or we its) looks DOWN: say why, one line each.
    for row in rows:
        if row["health"] == "DOWN" and (why := diagnose_handshake(row["address"], cli.tls, service=row["service"])):
            typer.echo(f"gristmill: {why}", err=True)
    if any(r["health"] != "SERVING" for r in rows):
        raise typer.Exit(1)


@app.command()
@one_line_errors
def dev(
    data_dir: Path = typer.Option(Path(".data/dev"), help="where the embedded services keep their data"),
    base_port: int | None = typer.Option(
        None, min=0, max=65529, help="first of the services' ports (0: any free ports; default: 50051..)"
    ),
) -> None:
    """Embedded mode: every service in one process on loopback, SQLite, local files, in-process bus.

    Prints ``READY labeling=... training=...`` once every service serves; Ctrl-C or SIGTERM stops it cleanly.
    """
    command = [sys.executable, "-m", "gristmill.standalone", "--data-dir", str(data_dir)]
    if base_port is not None:
        command += ["--base-port", str(base_port)]
    typer.echo("starting the embedded platform (Ctrl-C stops it)")
    child = subprocess.Popen(command, env={**os.environ, **SERVICE_BASE_ENV})

    def forward(signum: int, _frame: object) -> None:
        # The platform drains and stops on its own signal; this process waits for it.
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    raise typer.Exit(child.wait())


# --------------------------------------------------------------------------- using it

app.add_typer(labeling_commands.projects_app, name="projects")
app.command("import")(labeling_commands.import_command)
app.command("label")(annotation_commands.label_command)
app.add_typer(annotation_commands.predictions_app, name="predictions")
app.add_typer(annotation_commands.items_app, name="items")
app.add_typer(annotation_commands.annotations_app, name="annotations")
app.command("agreement")(labeling_commands.agreement_command)
app.add_typer(labeling_commands.datasets_app, name="datasets")
app.command("train")(training_commands.train_command)
app.add_typer(training_commands.jobs_app, name="jobs")
app.add_typer(training_commands.autotrain_app, name="autotrain")
app.add_typer(registry_commands.models_app, name="models")
app.add_typer(base_model_commands.base_models_app, name="base-models")
app.command("deploy")(serving_commands.deploy_command)
app.add_typer(serving_commands.deployments_app, name="deployments")
app.command("predict")(serving_commands.predict_command)
app.command("generate")(serving_commands.generate_command)
app.add_typer(admin_commands.orgs_app, name="orgs")
app.add_typer(admin_commands.plans_app, name="plans")
app.add_typer(admin_commands.keys_app, name="keys")
app.command("usage")(admin_commands.usage_command)
app.command("license")(admin_commands.license_command)
app.command("demo")(demo_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
