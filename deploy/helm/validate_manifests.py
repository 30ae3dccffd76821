"""Validate Kubernetes manifests offline and strictly: an unknown (misspelled) field is an error.

    validate_manifests.py [--kube-version 1.37 ...] [--crd CRD.yaml ...] [--quiet] MANIFEST.yaml ...

Core kinds are checked against the strict JSON schemas that the PyPI package kubernetes-validate ships for each
Kubernetes minor version (no network). Custom resources are checked against the openAPIV3Schema of their
CustomResourceDefinition (``--crd``: KubeRay's RayCluster, the Prometheus Operator's ServiceMonitor), made strict the
way the API server prunes: an object that lists its properties accepts no others, unless the CRD says
``x-kubernetes-preserve-unknown-fields`` or gives ``additionalProperties``. A document whose kind has no schema is an
error too. Each document is checked against every --kube-version given. Exit status 0 when every document is valid,
1 otherwise; one line per problem on stdout. deploy/helm-check.sh runs it on the chart's rendered manifests.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

CrdKey = tuple[str, str]  # (apiVersion, kind)
# libyaml when PyYAML has it: the RayCluster CRD alone is 0.9 MB of YAML.
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def strict_schema(schema: Any) -> Any:
    """A copy of an openAPIV3Schema in which every object that lists its properties rejects any other property."""
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_schema(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields", False)
    ):
        out["additionalProperties"] = False
    return out


def load_crd_schemas(paths: list[Path]) -> dict[CrdKey, dict[str, Any]]:
    """(apiVersion, kind) -> strict JSON schema, for every served version of every CRD in ``paths``."""
    schemas: dict[CrdKey, dict[str, Any]] = {}
    for path in paths:
        for crd in yaml.load_all(path.read_text(), Loader=Loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group = crd["spec"]["group"]
            kind = crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = (version.get("schema") or {}).get("openAPIV3Schema")
                if schema is not None:
                    schemas[(f"{group}/{version['name']}", kind)] = strict_schema(schema)
    return schemas


def documents(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for index, doc in enumerate(yaml.load_all(path.read_text(), Loader=Loader)):
        if doc:  # empty documents (a template that rendered nothing) are fine
            yield index, doc


def problems(doc: dict[str, Any], kube_version: str, crds: dict[CrdKey, dict[str, Any]]) -> list[str]:
    """What is wrong with one document: an empty list when it is valid."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return ["not a Kubernetes object (no apiVersion or kind)"]
    key = (doc["apiVersion"], doc["kind"])
    if key in crds:
        validator = jsonschema.Draft202012Validator(crds[key])
        return [
            f"{'.'.join(str(part) for part in error.absolute_path) or '(root)'}: {error.message}"
            for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        ]
    try:
        kubernetes_validate.validate(doc, kube_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(str(part) for part in error.path) or '(root)'}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {key[0]} {key[1]} in Kubernetes {kube_version} (nor a --crd)"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kube-version", action="append", help="e.g. 1.37 (repeatable; default: the newest)")
    parser.add_argument("--crd", action="append", default=[], type=Path, help="a CustomResourceDefinition file")
    parser.add_argument("--quiet", action="store_true", help="print problems only")
    parser.add_argument("manifests", nargs="+", type=Path)
    args = parser.parse_args(argv)

    versions = args.kube_version or [kubernetes_validate.latest_version()]
    crds = load_crd_schemas(args.crd)
    failed = checked = 0
    for path in args.manifests:
        for index, doc in documents(path):
            checked += 1
            name = f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"
            for version in versions:
                for problem in problems(doc, version, crds):
                    failed += 1
                    print(f"ERROR {path} document {index} {name} (Kubernetes {version}): {problem}")
    if not args.quiet:
        print(
            f"{checked} documents checked against Kubernetes {', '.join(versions)}"
            f" ({len(crds)} custom resource schemas): {failed} problems"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
