"""Verifying and copying a version's artifacts into the registry's own prefix.

The source manifest (``gristmill.core.manifests.ModelManifest``) is read against the checksum the
registration gave for it; every file it lists is downloaded, checked against its sha256 and size, and
copied to ``models/<model>/<version>/<name>``; then the registry writes its own ``manifest.json`` (new
keys, same checksums) and the generated model card there. Any problem ends the version FAILED with a
reason naming the file, and the copies made so far are removed: a FAILED version leaves nothing behind.

Runs outside any database transaction (it can take a while for large weights); the caller records the
outcome afterwards.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from gristmill.core.errors import DataIntegrityError, GristmillError, InvalidArgumentError, NotFoundError
from gristmill.core.manifests import DatasetManifest, FileEntry, ModelManifest
from gristmill.core.storage import ObjectStore, object_key
from gristmill.core.values import FileRef, Signature, TensorSpec
from gristmill.registry.domain import cards
from gristmill.registry.domain.model import (
    SPLITS,
    CardText,
    Metric,
    ModelCard,
    ModelVersion,
    VerificationOutcome,
    VersionStatus,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# Open Inference Protocol tensor datatypes.
DATATYPES = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
)


class _Failed(Exception):
    """Verification failed; the message is the version's status_reason."""


def validate_signature(signature: Signature, *, where: str = "signature") -> Signature:
    """Refuse a signature serving could not use: no inputs/outputs, unnamed tensors, unknown datatypes."""
    if not signature.inputs or not signature.outputs:
        raise InvalidArgumentError(f"{where} needs at least one input and one output tensor")
    seen: set[str] = set()
    for spec in (*signature.inputs, *signature.outputs):
        if not spec.name:
            raise InvalidArgumentError(f"{where}: every tensor needs a name")
        if spec.name in seen:
            raise InvalidArgumentError(f"{where}: tensor name {spec.name!r} is used twice")
        seen.add(spec.name)
        if spec.datatype not in DATATYPES:
            raise InvalidArgumentError(
                f"{where}: tensor {spec.name!r} has datatype {spec.datatype!r}; use one of {', '.join(DATATYPES)}"
            )
        if not spec.shape or any(d < -1 or d == 0 for d in spec.shape):
            raise InvalidArgumentError(
                f"{where}: tensor {spec.name!r} needs a shape of positive sizes or -1 (variable), e.g. [-1]"
            )
    return signature


def signature_from_manifest(raw: dict[str, Any]) -> Signature | None:
    """The manifest's ``signature`` dict ({"inputs": [{"name", "datatype", "shape"}], "outputs": [...]})."""
    if not raw:
        return None
    try:
        sides = {
            side: tuple(
                TensorSpec(str(t["name"]), str(t["datatype"]), tuple(int(d) for d in t["shape"])) for t in raw[side]
            )
            for side in ("inputs", "outputs")
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"the manifest's signature is malformed: {exc}") from None
    return validate_signature(Signature(sides["inputs"], sides["outputs"]), where="the manifest's signature")


def metrics_from_manifest(raw: dict[str, float]) -> tuple[Metric, ...]:
    """``{"accuracy/test": 0.91, "loss": 0.3}`` → metrics with their split."""
    out = []
    for label, value in sorted(raw.items()):
        name, _, split = label.partition("/")
        if split and split not in SPLITS:
            name, split = label, ""
        out.append(Metric(name=name, value=float(value), split=split))
    return tuple(out)


def signature_to_manifest(signature: Signature | None) -> dict[str, Any]:
    if signature is None:
        return {}
    return {
        side: [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]
        for side, specs in (("inputs", signature.inputs), ("outputs", signature.outputs))
    }


class ArtifactVerifier:
    """Checks and copies one version's artifacts. ``clock`` stamps the generated card."""

    def __init__(self, objects: ObjectStore, clock: Callable[[], datetime]) -> None:
        self.objects = objects
        self.clock = clock

    def verify(
        self, version: ModelVersion, *, model_task: str, model_label_map: tuple[str, ...]
    ) -> VerificationOutcome:
        written: list[str] = []
        try:
            return self._verify(version, model_task, model_label_map, written)
        except _Failed as failed:
            self._remove(written)
            log.warning("version %d of %s FAILED verification: %s", version.version, version.model_name, failed)
            return VerificationOutcome(status=VersionStatus.FAILED, reason=str(failed))
        except BaseException:
            # An outage (UnavailableError) or a crash: leave the version PENDING so verification resumes.
            self._remove(written)
            raise

    def _verify(
        self, version: ModelVersion, model_task: str, model_label_map: tuple[str, ...], written: list[str]
    ) -> VerificationOutcome:
        manifest = self._read_manifest(version)
        try:
            signature = version.signature or signature_from_manifest(manifest.signature)
        except InvalidArgumentError as exc:
            raise _Failed(str(exc)) from None
        if signature is None:
            raise _Failed("no signature: neither the registration nor the manifest gives input and output tensors")
        if not manifest.files:
            raise _Failed(f"{version.source_manifest.key}: the manifest lists no files")
        task = _first(version.task, manifest.task_type, model_task)
        label_map = version.label_map or tuple(manifest.label_map) or model_label_map
        metrics = version.metrics or metrics_from_manifest(manifest.metrics)
        prefix = version.artifact_prefix.rstrip("/")
        source_prefix = version.source_prefix
        copies: dict[str, FileEntry] = {}
        training_notes = ""
        with tempfile.TemporaryDirectory(prefix="registry-verify-") as tmp:
            for name, entry in sorted(manifest.files.items()):
                if name == MANIFEST_NAME:
                    raise _Failed(f"{name}: the manifest must not list itself")
                if not entry.key.startswith(source_prefix):
                    raise _Failed(f"{name}: {entry.key} is outside the source prefix {source_prefix}")
                local = Path(tmp) / "file"
                try:
                    info = self.objects.get_file(entry.key, local, expected_sha256=entry.sha256)
                except NotFoundError:
                    raise _Failed(f"{name}: missing ({entry.key} does not exist)") from None
                except DataIntegrityError as exc:
                    raise _Failed(f"{name}: sha256 mismatch ({exc})") from None
                if info.size != entry.size_bytes or local.stat().st_size != entry.size_bytes:
                    raise _Failed(
                        f"{name}: size mismatch ({local.stat().st_size} bytes, manifest says {entry.size_bytes})"
                    )
                if name == cards.card_key_name(1):
                    # The registry owns model-card.md; a card the training run wrote becomes a section of it.
                    training_notes = local.read_text(encoding="utf-8", errors="replace")
                    local.unlink()
                    continue
                key = object_key(prefix, name)
                self._put(key, local, entry.sha256, written)
                copies[name] = FileEntry(key=key, sha256=entry.sha256, size_bytes=entry.size_bytes)
                local.unlink()
        new_manifest = ModelManifest(
            files=copies,
            task_type=task,
            label_map=list(label_map),
            signature=signature_to_manifest(signature),
            lineage=manifest.lineage,
            metrics={m.label: m.value for m in metrics},
            base_model=manifest.base_model,
        )
        manifest_info = self.objects.put_bytes(
            object_key(prefix, MANIFEST_NAME), new_manifest.to_json(), content_type="application/json", overwrite=True
        )
        written.append(manifest_info.key)
        verified = _with(version, signature=signature, task=task, label_map=label_map, metrics=metrics)
        card = self._generate_card(verified, prefix, training_notes, written)
        return VerificationOutcome(
            status=VersionStatus.READY,
            files=tuple(FileRef(e.key, e.sha256, e.size_bytes) for _, e in sorted(copies.items())),
            manifest=FileRef(manifest_info.key, manifest_info.sha256, manifest_info.size),
            signature=signature,
            task=task,
            label_map=label_map,
            metrics=metrics,
            card=card,
        )

    def _read_manifest(self, version: ModelVersion) -> ModelManifest:
        ref = version.source_manifest
        try:
            raw = self.objects.get_bytes(ref.key, expected_sha256=ref.sha256)
        except NotFoundError:
            raise _Failed(f"{MANIFEST_NAME}: missing ({ref.key} does not exist)") from None
        except DataIntegrityError as exc:
            raise _Failed(f"{MANIFEST_NAME}: sha256 mismatch ({exc})") from None
        try:
            return ModelManifest.from_json(raw, where=ref.key)
        except (InvalidArgumentError, UnicodeDecodeError) as exc:
            raise _Failed(f"{MANIFEST_NAME}: {exc}") from None

    def _put(self, key: str, local: Path, sha256: str, written: list[str]) -> None:
        # A retried verification (after a crash or outage) finds its own earlier copies: keep a correct
        # one, replace anything else (the prefix belongs to this PENDING version alone).
        try:
            existing = self.objects.stat(key)
        except NotFoundError:
            existing = None
        if existing is None or existing.sha256 != sha256:
            self.objects.put_file(key, local, overwrite=existing is not None)
        written.append(key)

    def _generate_card(self, version: ModelVersion, prefix: str, training_notes: str, written: list[str]) -> ModelCard:
        counts, note = self._dataset_counts(version)
        summary = cards.training_summary(
            version, dataset_counts=counts, dataset_note=note, training_notes=training_notes
        )
        text = CardText()
        markdown = cards.render(version.model_name, version.version, version.task, text, summary, version.metrics)
        info = self.objects.put_bytes(
            object_key(prefix, cards.card_key_name(1)), markdown.encode(), content_type="text/markdown", overwrite=True
        )
        written.append(info.key)
        return ModelCard(
            model_name=version.model_name,
            version=version.version,
            revision=1,
            text=text,
            training_summary=summary,
            metrics=version.metrics,
            markdown=markdown,
            object=FileRef(info.key, info.sha256, info.size),
            updated_by="registry",
            update_time=self.clock(),
        )

    def _dataset_counts(self, version: ModelVersion) -> tuple[dict[str, tuple[int, dict[str, int]]] | None, str]:
        ref = version.lineage.dataset_manifest
        if ref is None:
            return None, "not recorded (no dataset manifest in the lineage)"
        try:
            dataset = DatasetManifest.from_json(self.objects.get_bytes(ref.key, expected_sha256=ref.sha256 or None))
        except (GristmillError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            # The card is informative; an unreadable dataset manifest does not fail the model.
            return None, f"unavailable ({exc})"
        return {name: (s.count, dict(s.label_counts)) for name, s in dataset.splits.items()}, ""

    def _remove(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.objects.delete(key)
            except GristmillError as exc:
                log.warning("could not remove %s after a failed verification: %s", key, exc)


def _first(*values: str) -> str:
    for value in values:
        if value and value != "TASK_TYPE_UNSPECIFIED":
            return value
    return "TASK_TYPE_UNSPECIFIED"


def _with(
    version: ModelVersion, *, signature: Signature, task: str, label_map: tuple[str, ...], metrics: tuple[Metric, ...]
) -> ModelVersion:
    return replace(version, signature=signature, task=task, label_map=label_map, metrics=metrics)
