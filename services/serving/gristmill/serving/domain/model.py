"""What a deployment is: the configuration people write (``DeploymentSpec``) and its validation.

Values here are concrete: the API layer fills the proto's "0 means the default" rules in before building a
spec, so a stored spec always says exactly what runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum

from gristmill.core.errors import InvalidArgumentError
from gristmill.core.ids import validate_id
from gristmill.core.values import DEFAULT_ORGANIZATION

__all__ = ["DEFAULT_ORGANIZATION"]
DEFAULT_ALIAS = "production"
# Per Predict / ModelInfer call (serving.proto).
MAX_TEXTS_PER_REQUEST = 1024
MAX_BATCH_SIZE = 1024
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_DELAY_MS = 5
# Longer than any useful batching window; a typo (seconds for milliseconds) is refused instead of served.
MAX_DELAY_MS = 10_000
QUEUE_PER_BATCH = 64
MAX_QUEUE_SIZE = 1_000_000
MAX_TOKENS_LIMIT = 8192
DEFAULT_UNCERTAINTY_THRESHOLD = 0.6
# Versions averaged beside the target's in an ensemble deployment: eight models per request at most.
MAX_ENSEMBLE_MEMBERS = 7


def organization_or_default(organization_id: str) -> str:
    """Organisations are a later issue: an empty id means the default organisation."""
    return organization_id or DEFAULT_ORGANIZATION


class Quantization(StrEnum):
    NONE = "none"
    # torch dynamic int8 quantisation of the Linear layers (CPU).
    DYNAMIC_INT8 = "dynamic_int8"
    # bfloat16 weights and compute (fast on CPUs with AVX-512 BF16 / AMX, and on GPUs).
    BF16 = "bf16"


class OverLengthAction(StrEnum):
    TRUNCATE = "truncate"
    REJECT = "reject"


@dataclass(frozen=True)
class VersionSelector:
    """A version number or an alias of a registered model (exactly one)."""

    version: int | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        if (self.version is None) == (self.alias is None):
            raise InvalidArgumentError("a version selector needs exactly one of a version number or an alias")

    def describe(self) -> str:
        return f"version {self.version}" if self.version is not None else f"alias {self.alias!r}"

    @staticmethod
    def of_alias(alias: str) -> VersionSelector:
        return VersionSelector(alias=alias)

    @staticmethod
    def of_version(version: int) -> VersionSelector:
        return VersionSelector(version=version)


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = DEFAULT_BATCH_SIZE
    max_delay_ms: int = DEFAULT_MAX_DELAY_MS
    # Texts waiting per version before calls answer RESOURCE_EXHAUSTED.
    max_queue_size: int = DEFAULT_BATCH_SIZE * QUEUE_PER_BATCH


@dataclass(frozen=True)
class LengthPolicy:
    # Tokens per text; 0 means the model's own limit (its training max_sequence_length when known).
    max_tokens: int = 0
    over_length_action: OverLengthAction = OverLengthAction.TRUNCATE


@dataclass(frozen=True)
class PredictionLoggingConfig:
    # Fraction of predictions logged at random.
    sample_rate: float = 0.0
    # A prediction whose top probability is below this is uncertain and always logged; 0 disables that.
    uncertainty_threshold: float = DEFAULT_UNCERTAINTY_THRESHOLD


@dataclass(frozen=True)
class CanaryRoute:
    target: VersionSelector
    # Fraction of requests routed to the canary, in (0, 1).
    weight: float


@dataclass(frozen=True)
class DeploymentSpec:
    organization_id: str
    name: str
    registered_model_name: str
    target: VersionSelector = field(default_factory=lambda: VersionSelector.of_alias(DEFAULT_ALIAS))
    canary: CanaryRoute | None = None
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    quantization: Quantization = Quantization.NONE
    length_policy: LengthPolicy = field(default_factory=LengthPolicy)
    prediction_logging: PredictionLoggingConfig = field(default_factory=PredictionLoggingConfig)
    # Version numbers of the registered model whose probabilities are averaged with the target's (an ensemble);
    # empty: the target alone.
    ensemble: tuple[int, ...] = ()
    create_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    update_time: datetime = field(default_factory=lambda: datetime.now(UTC))

    def touched(self) -> DeploymentSpec:
        return replace(self, update_time=datetime.now(UTC))


def validate_selector(selector: VersionSelector, *, what: str) -> VersionSelector:
    if selector.version is not None and selector.version < 1:
        raise InvalidArgumentError(f"{what}: version must be 1 or more, got {selector.version}")
    if selector.alias is not None:
        validate_id(selector.alias, what=f"{what} alias")
        if not selector.alias[0].isalpha():
            raise InvalidArgumentError(f"{what}: alias {selector.alias!r} must start with a letter")
    return selector


def validate_batching(batching: BatchingConfig) -> BatchingConfig:
    if not 1 <= batching.max_batch_size <= MAX_BATCH_SIZE:
        raise InvalidArgumentError(
            f"batching.max_batch_size must be between 1 and {MAX_BATCH_SIZE} (0 means {DEFAULT_BATCH_SIZE}), "
            f"got {batching.max_batch_size}"
        )
    if not 0 <= batching.max_delay_ms <= MAX_DELAY_MS:
        raise InvalidArgumentError(
            f"batching.max_delay_ms must be between 0 and {MAX_DELAY_MS} milliseconds, got {batching.max_delay_ms}"
        )
    if not batching.max_batch_size <= batching.max_queue_size <= MAX_QUEUE_SIZE:
        raise InvalidArgumentError(
            f"batching.max_queue_size must be between max_batch_size ({batching.max_batch_size}) and "
            f"{MAX_QUEUE_SIZE} (0 means {QUEUE_PER_BATCH} * max_batch_size), got {batching.max_queue_size}"
        )
    return batching


def validate_ensemble(spec: DeploymentSpec) -> None:
    members = spec.ensemble
    if not members:
        return
    if len(members) > MAX_ENSEMBLE_MEMBERS:
        raise InvalidArgumentError(
            f"ensemble_versions lists {len(members)} versions; an ensemble averages at most {MAX_ENSEMBLE_MEMBERS} "
            "beside the target's"
        )
    if len(set(members)) != len(members) or min(members) < 1:
        raise InvalidArgumentError(f"ensemble_versions must be distinct version numbers >= 1, got {list(members)}")
    if spec.target.version is not None and spec.target.version in members:
        raise InvalidArgumentError(
            f"ensemble_versions lists version {spec.target.version}, the target itself; list the other versions"
        )
    if spec.canary is not None:
        raise InvalidArgumentError(
            "a deployment is either an ensemble or split by a canary, not both: remove canary or ensemble_versions "
            "(a canary of an ensemble would compare it with one model, not with another ensemble)"
        )


def validate_spec(spec: DeploymentSpec) -> DeploymentSpec:
    """Return ``spec`` if every field is in range, else raise ``InvalidArgumentError`` naming the field."""
    validate_id(spec.name, what="deployment name")
    validate_id(spec.registered_model_name, what="registered_model_name")
    validate_selector(spec.target, what="target")
    if spec.canary is not None:
        validate_selector(spec.canary.target, what="canary.target")
        weight = spec.canary.weight
        if not (math.isfinite(weight) and 0.0 < weight < 1.0):
            raise InvalidArgumentError(
                f"canary.weight must be strictly between 0 and 1 (the canary's share of requests), got {weight}"
            )
        if spec.canary.target == spec.target:
            raise InvalidArgumentError(
                f"canary.target ({spec.canary.target.describe()}) is the same as the primary target; "
                "a canary must name another version or alias"
            )
    validate_ensemble(spec)
    validate_batching(spec.batching)
    if not 0 <= spec.length_policy.max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidArgumentError(
            f"length_policy.max_tokens must be between 0 and {MAX_TOKENS_LIMIT} (0 means the model's limit), "
            f"got {spec.length_policy.max_tokens}"
        )
    logging = spec.prediction_logging
    if not (math.isfinite(logging.sample_rate) and 0.0 <= logging.sample_rate <= 1.0):
        raise InvalidArgumentError(f"prediction_logging.sample_rate must be between 0 and 1, got {logging.sample_rate}")
    if not (math.isfinite(logging.uncertainty_threshold) and 0.0 <= logging.uncertainty_threshold <= 1.0):
        raise InvalidArgumentError(
            "prediction_logging.uncertainty_threshold must be between 0 and 1 (0 disables uncertainty logging), "
            f"got {logging.uncertainty_threshold}"
        )
    return spec
