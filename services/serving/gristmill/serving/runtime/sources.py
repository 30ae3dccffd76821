"""Model sources: the registry (download manifest over gRPC, files from the object store, checksums verified)
and a local directory (tests, experiments).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import grpc

from gristmill.api.common.v1 import common_pb2
from gristmill.api.registry.v1 import registry_pb2, registry_pb2_grpc
from gristmill.core.base_models import RegistryBaseModels
from gristmill.core.chat_templates import LINEAGE_KEY
from gristmill.core.errors import (
    DataIntegrityError,
    FailedPreconditionError,
    GristmillError,
    NotFoundError,
    remote_call_error,
)
from gristmill.core.ids import validate_id
from gristmill.core.manifests import FileEntry, download_files, relative_name
from gristmill.core.storage import ObjectStore, validate_key
from gristmill.core.tls import ReloadingChannel, TlsSettings
from gristmill.core.values import TensorSpec
from gristmill.serving.domain.model import VersionSelector
from gristmill.serving.domain.sources import (
    ADAPTER_CONFIG,
    BASE_DIR,
    TASK_SINGLE_LABEL,
    ModelFile,
    ModelSource,
    ResolvedVersion,
)

log = logging.getLogger(__name__)

# Lineage hyper-parameters that carry the training sequence length, by the names trainers use.
_LENGTH_KEYS = ("max_sequence_length", "max_length", "max_seq_length")


def download_verified(objects: ObjectStore, resolved: ResolvedVersion, dest: Path) -> Path:
    """``dest`` holding every file of ``resolved``, each verified against its sha256 (``download_files``: files
    already there are reused when they match; a crash never leaves a half-downloaded model that looks complete)."""
    if not resolved.files:
        raise DataIntegrityError(
            f"version {resolved.version} of {resolved.registered_model_name} lists no files to download"
        )
    return download_files(objects, {f.name: FileEntry(f.key, f.sha256, f.size_bytes) for f in resolved.files}, dest)


def _tensors(specs: object) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in specs)  # type: ignore[attr-defined]


def resolved_from_manifest(manifest: registry_pb2.DownloadManifest) -> ResolvedVersion:
    """The domain's view of the registry's download manifest."""
    prefix = manifest.artifact_prefix
    files = []
    for ref in manifest.files:
        name = relative_name(ref.key, prefix)
        files.append(ModelFile(name=name, key=ref.key, sha256=ref.sha256, size_bytes=ref.size_bytes))
    hyper = manifest.lineage.hyper_parameters
    length = 0
    for key in _LENGTH_KEYS:
        if hyper.get(key, "").isdigit():
            length = int(hyper[key])
            break
    task = common_pb2.TaskType.Name(manifest.task) if manifest.task else TASK_SINGLE_LABEL
    return ResolvedVersion(
        registered_model_name=manifest.registered_model_name,
        version=manifest.version,
        files=tuple(files),
        resolved_alias=manifest.resolved_alias,
        label_map=tuple(manifest.label_map.labels),
        task=task,
        inputs=_tensors(manifest.signature.inputs),
        outputs=_tensors(manifest.signature.outputs),
        labeling_project_id=manifest.lineage.dataset_version.project_id,
        max_sequence_length=length,
        base_model_name=manifest.lineage.base_model.base_model_name,
        base_model_sha256=manifest.lineage.base_model.content_sha256,
        chat_template_sha256=hyper.get(LINEAGE_KEY, ""),
        extra={"artifact_prefix": prefix},
    )


def _registry_error(exc: grpc.RpcError, address: str, what: str) -> GristmillError:
    return remote_call_error(exc, service="registry", address=address, what=what)


class RegistryModelSource(ModelSource):
    """Resolves through the registry's ``GetDownloadManifest``; downloads from the object store into a cache."""

    def __init__(
        self,
        address: str,
        objects: ObjectStore,
        cache_dir: Path,
        *,
        timeout_s: float = 30.0,
        tls: TlsSettings | None = None,
        metadata_for: Callable[[str], tuple[tuple[str, str], ...]] = lambda organization_id: (),
    ) -> None:
        """``tls``: mTLS to the registry (renewed files are presented after SIGHUP); ``metadata_for(organization_id)``:
        this service's key, acting for the deployment's organisation (``Security.call_metadata``)."""
        self.address = address
        self._objects = objects
        self._cache_dir = Path(cache_dir)
        self._timeout_s = timeout_s
        self._metadata_for = metadata_for
        self._channel = ReloadingChannel(address, tls)
        self._base_models = RegistryBaseModels(address, timeout_s=timeout_s, tls=tls, metadata_for=metadata_for)

    def resolve(self, organization_id: str, registered_model_name: str, selector: VersionSelector) -> ResolvedVersion:
        validate_id(registered_model_name, what="registered_model_name")
        request = registry_pb2.GetDownloadManifestRequest(registered_model_name=registered_model_name)
        if selector.version is not None:
            request.selector.version = selector.version
        elif selector.alias is not None:
            request.selector.alias = selector.alias
        what = f"{selector.describe()} of {registered_model_name!r}"
        try:
            with self._channel.use() as channel:
                manifest = registry_pb2_grpc.RegistryServiceStub(channel).GetDownloadManifest(
                    request, timeout=self._timeout_s, metadata=self._metadata_for(organization_id)
                )
        except grpc.RpcError as exc:
            raise _registry_error(exc, self.address, what) from None
        resolved = resolved_from_manifest(manifest)
        # fetch() looks up an adapter's base model for the same organisation.
        resolved.extra["organization_id"] = organization_id
        return resolved

    def model_exists(self, organization_id: str, registered_model_name: str) -> bool:
        validate_id(registered_model_name, what="registered_model_name")
        request = registry_pb2.GetRegisteredModelRequest(name=registered_model_name)
        try:
            with self._channel.use() as channel:
                registry_pb2_grpc.RegistryServiceStub(channel).GetRegisteredModel(
                    request, timeout=self._timeout_s, metadata=self._metadata_for(organization_id)
                )
        except grpc.RpcError as exc:
            error = _registry_error(exc, self.address, f"registered model {registered_model_name!r}")
            if isinstance(error, NotFoundError):
                return False
            raise error from None
        return True

    def fetch(self, resolved: ResolvedVersion) -> Path:
        # Cached by the registry's artifact prefix (a validated key, unique per stored version).
        prefix = str(resolved.extra.get("artifact_prefix", "")).strip("/")
        relative = validate_key(prefix) if prefix else f"{resolved.registered_model_name}/{resolved.version}"
        directory = download_verified(self._objects, resolved, self._cache_dir / relative)
        if (directory / ADAPTER_CONFIG).is_file():
            self._link_base_model(resolved, directory)
        return directory

    def _link_base_model(self, resolved: ResolvedVersion, directory: Path) -> None:
        """Fetch the base model an adapter was trained on (verified, cached by content) and link it into the
        version's directory; FAILED_PRECONDITION when the lineage names none or the registry's copy changed."""
        what = f"version {resolved.version} of {resolved.registered_model_name}"
        if not resolved.base_model_name:
            raise FailedPreconditionError(
                f"{what} is a LoRA adapter whose lineage names no registry base model (it was trained from a path "
                "or an object prefix): import that base model into the registry and train from it, or publish "
                "the merged model"
            )
        organization_id = str(resolved.extra.get("organization_id", ""))
        base = self._base_models.lookup(organization_id, resolved.base_model_name)
        if resolved.base_model_sha256 and base.content_sha256 != resolved.base_model_sha256:
            raise FailedPreconditionError(
                f"{what} was trained on base model {resolved.base_model_name!r} with content "
                f"{resolved.base_model_sha256[:12]}, but the registry's copy is now {base.content_sha256[:12]}: "
                "its adapter would not match; re-import the original base model or train again"
            )
        base_dir = base.download(self._objects, self._cache_dir / "base-models" / base.content_sha256)
        link = directory / BASE_DIR
        if link.is_symlink() and link.resolve() == base_dir.resolve():
            return
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(base_dir.resolve(), target_is_directory=True)

    def close(self) -> None:
        self._channel.close()
        self._base_models.close()


class LocalDirectoryModelSource(ModelSource):
    """Versions are Hugging Face model directories ``<root>/<model>/<version>/``; aliases live in memory.

    For unit tests and local experiments: nothing is downloaded, so nothing is verified either.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._aliases: dict[tuple[str, str], int] = {}

    def set_alias(self, model: str, alias: str, version: int | None) -> None:
        if version is None:
            self._aliases.pop((model, alias), None)
        else:
            self._aliases[(model, alias)] = version

    def resolve(self, organization_id: str, registered_model_name: str, selector: VersionSelector) -> ResolvedVersion:
        model = validate_id(registered_model_name, what="registered_model_name")
        if not (self.root / model).is_dir():
            raise NotFoundError(f"registered model {model!r} does not exist")
        version = selector.version
        if selector.alias is not None:
            version = self._aliases.get((model, selector.alias))
            if version is None:
                raise NotFoundError(f"registered model {model!r} has no alias {selector.alias!r}")
        path = self.root / model / str(version)
        if not (path / "config.json").is_file():
            raise NotFoundError(f"registered model {model!r} has no version {version}")
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        id2label = config.get("id2label") or {}
        labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
        assert version is not None
        return ResolvedVersion(
            registered_model_name=model,
            version=version,
            resolved_alias=selector.alias or "",
            label_map=labels,
            extra={"path": str(path)},
        )

    def fetch(self, resolved: ResolvedVersion) -> Path:
        return Path(resolved.extra["path"])
