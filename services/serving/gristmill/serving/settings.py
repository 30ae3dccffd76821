"""The serving service's settings (``GRISTMILL_SERVING_*``), read once by ``__main__``."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from gristmill.core.events.topics import SERVING_ALIASES
from gristmill.core.ports import OPENAI_HTTP_PORT_OFFSET, SERVING_PORT, default_address
from gristmill.core.settings import ServiceSettings
from gristmill.serving.domain.generation import (
    DEFAULT_CACHE_TOKENS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_SEQUENCES,
    DEFAULT_PREFILL_TOKENS,
    DEFAULT_PREFIX_CACHE_MIB,
    EngineLimits,
)

_REPLICA_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


class ServingSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GRISTMILL_SERVING_", extra="ignore", frozen=True)

    grpc_port: int = Field(default=SERVING_PORT, ge=0, le=65535)
    # The OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models). Unset: the gRPC port + 2
    # (gristmill.core.ports: 50056 by default; a serving replica's moves with its gRPC port; a free port when
    # grpc_port is 0); 0: a free port; -1: not served.
    openai_port: int | None = Field(default=None, ge=-1, le=65535, validate_default=True)
    # Where the registry's gRPC API listens; models load from its download manifests.
    registry_address: str = default_address("registry")
    # Seconds a registry call may take before a load counts as failed.
    registry_timeout_s: float = Field(default=30.0, gt=0)
    # Downloaded, checksum-verified model files. Empty means <data_dir>/models.
    model_cache_dir: Path | None = None
    # torch intra-op threads per batch; 0 means one per CPU core. The default runs each batch on one thread and
    # several batches side by side (BATCH_WORKERS): measured on 2 cores with MiniLM, 1 thread x 2 workers served
    # 292 texts/s at concurrency 64 where 2 threads x 1 worker served 215, and it does not stall when another
    # process takes a core (OpenMP threads wait for each other at every operation).
    torch_threads: int = Field(default=1, ge=0, le=256)
    # Batches of one model version that may run at once, each on its own thread; 0 means one per CPU core.
    batch_workers: int = Field(default=0, ge=0, le=64)
    # A classifier batch that finds no other batch running and nothing queued (light load), while recent batches
    # did not overlap other work, runs with every core's intra-op threads (TORCH_THREADS x BATCH_WORKERS, at most
    # one per core) instead of TORCH_THREADS: MiniLM on 2 cores answers one sentence in ~4.4 ms instead of ~6.2.
    # Under load batches run side by side as before; where TORCH_THREADS already uses every core nothing changes.
    light_load_every_core: bool = True
    # Run models as TorchScript traces (checked against the eager model at load; eager when that fails).
    trace_models: bool = True
    # Consumer group of the alias-changed consumer (``resolved_consumer_group``: one per replica).
    consumer_group: str = SERVING_ALIASES.default
    # This process's id among the serving replicas of one deployment (processes sharing one database): empty for a
    # single instance. Each replica reads alias changes in a group of its own, ``<consumer_group>.<replica>``, so
    # that every replica hot-swaps (one shared group would hand each event to one replica only).
    replica: str = ""
    # Seconds between two reads of the deployment store: deployments created, changed or deleted through another
    # replica are served (or dropped) here within this time.
    deployment_sync_s: float = Field(default=2.0, gt=0)
    # How often the counts of how replies ended (per version) go out as GenerationOutcomes events, for the
    # registry's online gate; also once at shutdown.
    outcomes_flush_s: float = Field(default=5.0, gt=0)
    # Prediction-log events waiting to be written to the outbox before new ones are dropped (and counted).
    prediction_log_capacity: int = Field(default=10_000, ge=1)
    # Every answered request writes usage (and some a prediction log) to the outbox: under a trickle of requests
    # the relay publishes what 1 s gathered as one record set rather than one per request (the admin's
    # aggregator then sums a batch per transaction). Usage reaches the admin (and other replicas' quota counters)
    # that much later. 1 s rather than 0.2: at one caller at a time the relay, Kafka, the aggregator and
    # PostgreSQL then wake once a second instead of ~5 times, ~35 % less of their CPU per call, and each wake-up
    # had stalled a model forward that uses every core (the stack's p50 over the embedded process's went from
    # +2.1 to +1.6 ms in paired runs, services/serving/README.md). The cost: a wider quota bound across replicas.
    outbox_linger_s: float = Field(default=1.0, ge=0, le=5)
    # The continuous batcher of each generative base model (what vLLM calls its engine arguments), the same for
    # every chat deployment of this process: sequences decoding together (vLLM's --max-num-seqs); tokens reserved
    # across them, each request's prompt plus max_tokens (the KV cache budget; a longer single request is
    # INVALID_ARGUMENT); requests waiting for a place before RESOURCE_EXHAUSTED; prompt tokens prefilled in one
    # step (a burst of long prompts is spread over steps); MiB of prompt prefixes kept for later prompts that start
    # alike (0: no prefix caching); torch threads of the model's thread (0: one per CPU core).
    generation_max_sequences: int = Field(default=DEFAULT_MAX_SEQUENCES, ge=1, le=4096)
    generation_max_cache_tokens: int = Field(default=DEFAULT_CACHE_TOKENS, ge=16, le=16 * 2**20)
    generation_max_queue: int = Field(default=DEFAULT_MAX_QUEUE, ge=1, le=1_000_000)
    generation_max_prefill_tokens: int = Field(default=DEFAULT_PREFILL_TOKENS, ge=1, le=16 * 2**20)
    generation_prefix_cache_mib: int = Field(default=DEFAULT_PREFIX_CACHE_MIB, ge=0, le=2**20)
    generation_threads: int = Field(default=0, ge=0, le=256)

    @field_validator("replica")
    @classmethod
    def _replica_id(cls, value: str) -> str:
        if value and not _REPLICA_ID.fullmatch(value):
            raise ValueError(
                f"replica id {value!r}: use 1-32 lowercase letters, digits or '-', starting with a letter or digit "
                "(e.g. r1), or leave it empty for a single instance"
            )
        return value

    @field_validator("openai_port")
    @classmethod
    def _openai_port_fits(cls, value: int | None, info: ValidationInfo) -> int | None:
        grpc_port = info.data.get("grpc_port", 0)
        if value is None and grpc_port + OPENAI_HTTP_PORT_OFFSET > 65535:
            raise ValueError(
                f"the default (the gRPC port {grpc_port} + {OPENAI_HTTP_PORT_OFFSET}) is beyond 65535: set a port, "
                "or -1 to serve no HTTP API"
            )
        return value

    def resolved_openai_port(self) -> int | None:
        """The OpenAI-compatible HTTP API's port (0: any free one), or None when it is not served."""
        if self.openai_port is None:
            return self.grpc_port + OPENAI_HTTP_PORT_OFFSET if self.grpc_port else 0
        return None if self.openai_port < 0 else self.openai_port

    def resolved_consumer_group(self) -> str:
        """The alias-changed consumer's group: ``consumer_group``, suffixed with the replica id when there is one."""
        return f"{self.consumer_group}.{self.replica}" if self.replica else self.consumer_group

    def resolved_batch_workers(self) -> int:
        return self.batch_workers or os.cpu_count() or 1

    def generation_limits(self) -> EngineLimits:
        """The continuous batcher's limits these settings give (``generation_*``)."""
        return EngineLimits(
            max_sequences=self.generation_max_sequences,
            max_cache_tokens=self.generation_max_cache_tokens,
            max_queue=self.generation_max_queue,
            max_prefill_tokens=self.generation_max_prefill_tokens,
            prefix_cache_bytes=self.generation_prefix_cache_mib * 2**20,
            threads=self.generation_threads or os.cpu_count() or 1,
        )

    def resolved_model_cache_dir(self) -> Path:
        return self.model_cache_dir or self.data_dir / "models"
