"""Check that the alert rules and the Grafana dashboard only use metrics (and labels) that the code exports.

    check_metrics.py ALERTS.yml DASHBOARD.json SOURCE_DIR... [--protos DIR] [--dashboard-rules FILE]
                     [--compose FILE --prometheus FILE]

The exported metrics are read from the Python sources: every ``Counter``/``Gauge``/``Histogram``/``Summary`` call
whose first argument is a ``gristmill_*`` name, with its label names (the third argument). Every ``gristmill_*``
name in an alert's expression or a dashboard panel's query must be one of them (a histogram's ``_bucket``,
``_count`` and ``_sum`` series count as the histogram), and every label matched in ``name{label=...}`` one of its
labels. With ``--dashboard-rules FILE``, the dashboard's queries (Grafana's variables replaced by values) are
written to FILE as recording rules, for ``promtool check rules`` to parse. With ``--protos``, every streaming RPC
in the .proto files must be named in the exclusion of the RPC latency alert (a streaming call lasts as long as its
stream). With ``--compose FILE --prometheus FILE``, Prometheus's scrape targets must be exactly the Compose services'
metrics ports (``<service>:<GRISTMILL_<SERVICE>_METRICS_PORT>``). The dashboard must parse as JSON. Exit status 0
when all holds, 1 otherwise, with one line per problem.
deploy/monitoring-check.sh runs it.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

METRIC_KINDS = {"Counter", "Gauge", "Histogram", "Summary"}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
# Labels Prometheus adds to every scraped series, and the bucket bound of histograms.
SCRAPE_LABELS = {"job", "instance", "le"}
NAME = re.compile(r"\bgristmill_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(gristmill_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
STREAMING_RPC = re.compile(r"\brpc\s+(\w+)\s*\(\s*(stream\s+)?[\w.]+\s*\)\s*returns\s*\(\s*(stream\s+)?")
LATENCY_ALERT = "GristmillRpcLatencyP99"
# Grafana's variables in the dashboard's queries, replaced for promtool.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$deployment": ".*"}


def exported_metrics(sources: list[Path]) -> dict[str, set[str]]:
    """name -> label names, for every gristmill_* metric created in the Python files under ``sources``."""
    metrics: dict[str, set[str]] = {}
    for root in sources:
        for path in sorted(root.rglob("*.py")):
            if "tests" in path.parts or ".venv" in path.parts:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func
                kind = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                first = node.args[0]
                if kind not in METRIC_KINDS or not isinstance(first, ast.Constant) or not isinstance(first.value, str):
                    continue
                if not first.value.startswith("gristmill_"):
                    continue
                labels: set[str] = set()
                label_arg = node.args[2] if len(node.args) > 2 else None
                for keyword in node.keywords:
                    if keyword.arg == "labelnames":
                        label_arg = keyword.value
                if isinstance(label_arg, (ast.List, ast.Tuple)):
                    labels = {str(e.value) for e in label_arg.elts if isinstance(e, ast.Constant)}
                series = [first.value]
                if kind in ("Histogram", "Summary"):
                    series += [first.value + suffix for suffix in HISTOGRAM_SUFFIXES]
                for name in series:
                    metrics.setdefault(name, set()).update(labels)
    return metrics


def alert_queries(path: Path) -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            yield f"{path.name}: {rule.get('alert') or rule.get('record')}", rule["expr"]


def dashboard_queries(path: Path) -> Iterator[tuple[str, str]]:
    dashboard = json.loads(path.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    found = False
    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found = True
                yield f"{path.name}: panel {panel.get('title')!r}", target["expr"]
    if not found:
        yield f"{path.name}", "no panel has a query"


def check_query(where: str, expr: str, metrics: dict[str, set[str]]) -> list[str]:
    problems = []
    for name in sorted(set(NAME.findall(expr))):
        if name not in metrics:
            problems.append(f"{where}: {name} is not a metric the services export")
    for name, matchers in SELECTOR.findall(expr):
        for label in MATCHER.findall(matchers):
            if name in metrics and label not in metrics[name] | SCRAPE_LABELS:
                problems.append(f"{where}: {name} has no label {label!r} (it has {sorted(metrics[name])})")
    return problems


def check_streaming_rpcs(alerts: Path, protos: Path) -> list[str]:
    streaming = set()
    for path in sorted(protos.rglob("*.proto")):
        for match in STREAMING_RPC.finditer(path.read_text()):
            if match.group(2) or match.group(3):
                streaming.add(match.group(1))
    exprs = [expr for where, expr in alert_queries(alerts) if where.endswith(f": {LATENCY_ALERT}")]
    if not exprs:
        return [f"{alerts.name}: no alert {LATENCY_ALERT}"]
    exclusion = re.search(r'method!~"[^"]*\(([^)]*)\)"', exprs[0])
    excluded = set(exclusion.group(1).split("|")) if exclusion else set()
    return [
        f"{alerts.name}: {LATENCY_ALERT} does not leave out the streaming RPC {name} (method!~...)"
        for name in sorted(streaming - excluded)
    ]


def write_dashboard_rules(dashboard: Path, out: Path) -> None:
    rules = []
    for i, (where, expr) in enumerate(dashboard_queries(dashboard)):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr, "labels": {"panel": where}})
    out.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))


def check_scrape_targets(compose: Path, prometheus: Path) -> list[str]:
    expected = set()
    for name, service in yaml.safe_load(compose.read_text())["services"].items():
        port = (service.get("environment") or {}).get(f"GRISTMILL_{name.upper()}_METRICS_PORT")
        if port is not None:
            expected.add(f"{name}:{port}")
    scraped = set()
    for job in yaml.safe_load(prometheus.read_text())["scrape_configs"]:
        if job["job_name"].startswith("gristmill-"):
            for static in job.get("static_configs", []):
                scraped.update(static["targets"])
    problems = [f"{prometheus.name}: no job scrapes {target} ({compose.name})" for target in sorted(expected - scraped)]
    problems += [
        f"{prometheus.name}: {target} is no service's metrics port in {compose.name}"
        for target in sorted(scraped - expected)
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("alerts", type=Path)
    parser.add_argument("dashboard", type=Path)
    parser.add_argument("sources", type=Path, nargs="+")
    parser.add_argument("--protos", type=Path)
    parser.add_argument("--dashboard-rules", type=Path)
    parser.add_argument("--compose", type=Path)
    parser.add_argument("--prometheus", type=Path)
    args = parser.parse_args(argv)

    metrics = exported_metrics(args.sources)
    problems: list[str] = []
    try:
        queries = [*alert_queries(args.alerts), *dashboard_queries(args.dashboard)]
    except (json.JSONDecodeError, yaml.YAMLError, KeyError) as exc:
        print(f"cannot read the rules or the dashboard: {exc}")
        return 1
    for where, expr in queries:
        if expr == "no panel has a query":
            problems.append(f"{where}: {expr}")
        else:
            problems += check_query(where, expr, metrics)
    if args.dashboard_rules and not problems:
        write_dashboard_rules(args.dashboard, args.dashboard_rules)
    if args.protos:
        problems += check_streaming_rpcs(args.alerts, args.protos)
    if args.compose and args.prometheus:
        problems += check_scrape_targets(args.compose, args.prometheus)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
