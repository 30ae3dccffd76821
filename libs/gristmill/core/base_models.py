"""Base models by registry name, for the services that use one (training builds on it, labeling counts tokens
with its tokenizer): ``RegistryBaseModels`` asks the registry's ``GetBaseModel`` what a name holds, and
``StoredBaseModel.download`` fetches those files from the object store, each verified against the checksum the
registry recorded when it imported them."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from gristmill.api.registry.v1 import registry_pb2, registry_pb2_grpc
from gristmill.core.errors import DataIntegrityError, FailedPreconditionError, NotFoundError, remote_call_error
from gristmill.core.ids import validate_id
from gristmill.core.manifests import FileEntry, download_files, relative_name
from gristmill.core.storage import ObjectStore
from gristmill.core.tls import ReloadingChannel, TlsSettings

_SHA256 = re.compile(r"[0-9a-f]{64}")


def content_sha256(files: Mapping[str, str]) -> str:
    """One checksum over a model's files (relative name → sha256): the SHA-256 of ``name\\tsha256\\n`` lines in
    name order. The registry records it for a base model; training puts it in the lineage
    (``BaseModelRef.content_sha256``)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\t{files[name]}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredBaseModel:
    """A base model the registry imported: its files (name inside the model directory → entry)."""

    name: str
    content_sha256: str
    files: Mapping[str, FileEntry]
    chat_template_sha256: str = ""

    def download(self, objects: ObjectStore, dest: Path, *, only: Collection[str] | None = None) -> Path:
        """``dest`` holding the model's files (those named in ``only`` when given), each verified.

        FAILED_PRECONDITION when a file the registry lists is gone from the object store."""
        files = {n: e for n, e in self.files.items() if only is None or n in only}
        try:
            return download_files(objects, files, dest)
        except NotFoundError:
            raise FailedPreconditionError(
                f"base model {self.name!r}: a file the registry lists is missing from the object store; import the "
                "base model again"
            ) from None


def stored_base_model(base: registry_pb2.BaseModel) -> StoredBaseModel:
    """The registry's answer as a ``StoredBaseModel``; DATA_LOSS when its content checksum is missing or does not
    cover the files it lists."""
    if not _SHA256.fullmatch(base.content_sha256):
        raise DataIntegrityError(f"the registry's base model {base.name!r} has no valid content_sha256")
    files = {
        relative_name(ref.key, base.artifact_prefix): FileEntry(ref.key, ref.sha256, ref.size_bytes)
        for ref in base.files
    }
    if content_sha256({name: entry.sha256 for name, entry in files.items()}) != base.content_sha256:
        raise DataIntegrityError(
            f"the registry's base model {base.name!r}: its file list does not match its content_sha256"
        )
    return StoredBaseModel(
        name=base.name,
        content_sha256=base.content_sha256,
        files=files,
        chat_template_sha256=base.chat_template_sha256,
    )


class RegistryBaseModels:
    """``GetBaseModel`` on the registry at ``address``, with this service's key acting for the caller's
    organisation (``metadata_for``, e.g. ``Security.call_metadata``) over mTLS when ``tls`` is given."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 30.0,
        tls: TlsSettings | None = None,
        metadata_for: Callable[[str], tuple[tuple[str, str], ...]] = lambda organization_id: (),
    ) -> None:
        self.address = address
        self._timeout_s = timeout_s
        self._metadata_for = metadata_for
        self._channel = ReloadingChannel(address, tls)

    def get(self, organization_id: str, name: str, *, field: str = "base_model_name") -> registry_pb2.BaseModel:
        """The registry's record of base model ``name`` (``field`` names where the name came from in errors)."""
        validate_id(name, what=field)
        try:
            with self._channel.use() as channel:
                return registry_pb2_grpc.RegistryServiceStub(channel).GetBaseModel(
                    registry_pb2.GetBaseModelRequest(name=name),
                    timeout=self._timeout_s,
                    metadata=self._metadata_for(organization_id),
                )
        except grpc.RpcError as exc:
            raise remote_call_error(
                exc, service="registry", address=self.address, what=f"base model {name!r}"
            ) from None

    def lookup(self, organization_id: str, name: str) -> StoredBaseModel:
        return stored_base_model(self.get(organization_id, name))

    def close(self) -> None:
        self._channel.close()
