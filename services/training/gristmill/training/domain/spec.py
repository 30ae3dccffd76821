"""What to train: the job spec with every default filled in, and the rules its fields follow.

The API layer hands the raw request values (0 / None where the caller left a field unset) to the
``build_*`` functions here; they apply the documented defaults and refuse out-of-range values with an
``InvalidArgumentError`` that names the field. The result is the *effective* spec: what the job runs
with, what the store keeps and what the lineage records.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from gristmill.core.chat_templates import LINEAGE_KEY, chat_template_sha256
from gristmill.core.errors import FailedPreconditionError, InvalidArgumentError
from gristmill.core.ids import validate_id
from gristmill.training.domain.dpo import DpoLoss as DpoLoss
from gristmill.training.domain.dpo import DpoSettings as DpoSettings
from gristmill.training.domain.lora import LoraSettings
from gristmill.training.domain.objectives import GENERATIVE_OBJECTIVES as GENERATIVE_OBJECTIVES
from gristmill.training.domain.objectives import JSON_MATCH_METRIC_PREFIX as JSON_MATCH_METRIC_PREFIX
from gristmill.training.domain.objectives import JSON_VALID_METRIC as JSON_VALID_METRIC
from gristmill.training.domain.objectives import OBJECTIVE_TASK_TYPES as OBJECTIVE_TASK_TYPES
from gristmill.training.domain.objectives import Objective as Objective
from gristmill.training.domain.objectives import TaskType as TaskType
from gristmill.training.domain.objectives import default_objective as default_objective
from gristmill.training.domain.objectives import json_match_metric as json_match_metric
from gristmill.training.domain.refs import BaseModelRef, DatasetRef


def objective_not_available(objective: Objective, where: str) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"{where}: objective {objective.value} is not available yet; training supports "
        f"{', '.join(available_objectives())}",
        details={"field": "spec.objective"},
    )


def available_objectives() -> tuple[str, ...]:
    # Imported here: the task modules load their libraries lazily, but the registry is the service's.
    from gristmill.training.tasks import TRAINING_TASKS, training_task

    return tuple(training_task(name).objective.value for name in TRAINING_TASKS.names())


class Method(StrEnum):
    FULL = "full"
    LORA = "lora"
    # LoRA over a 4-bit (NF4) base: CUDA GPUs and bitsandbytes only, generative objectives only.
    QLORA = "qlora"
    # (IA)^3 scaling vectors (PEFT): classifiers only, merged into the published weights.
    IA3 = "ia3"

    @property
    def adapters(self) -> bool:
        """Whether the job trains LoRA adapters (``spec.lora`` applies)."""
        return self in (Method.LORA, Method.QLORA)


class Precision(StrEnum):
    # bf16 where the device supports it (CUDA with bf16), otherwise fp32.
    AUTO = "auto"
    NO = "no"
    BF16 = "bf16"
    FP16 = "fp16"


class Schedule(StrEnum):
    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"


class Goal(StrEnum):
    MAXIMIZE = "maximize"
    MINIMIZE = "minimize"


class Scheduler(StrEnum):
    ASHA = "asha"
    FIFO = "fifo"


class Distribution(StrEnum):
    UNIFORM = "uniform"
    LOG_UNIFORM = "log_uniform"
    CHOICE = "choice"


# Every metric some objective evaluates; which ones a job's objective reports is checked when the spec is
# resolved (``TrainingTask.metrics``).
VALIDATION_METRICS = ("accuracy", "f1", "loss", "perplexity", "reward_accuracy", "reward_margin")
# The validation metric when the spec names none (classification's; ``resolve.with_objective_metrics`` gives
# objectives that do not report it their own).
DEFAULT_VALIDATION_METRIC = "f1"
# Metrics where smaller is better (their goal when none is given).
MINIMIZED_METRICS = frozenset({"loss", "perplexity"})
# Metrics measured once, on the test split at the end of training, never on validation: generation's
# (sft, dpo: greedy replies against the reference) and the merged model's loss (publish_merged). Not validation
# metrics; nor is any "json_match_<key>" (spec.json_match_keys).
TEST_ONLY_METRICS = ("exact_match", "rouge_l", JSON_VALID_METRIC, "merged_loss", "merged_perplexity")

# (IA)^3 vectors start at 1 and need large steps to move: at 3e-3 (its paper's rate, over ~1,000 steps) MiniLM on 100
# labels (70 steps) stayed at chance in 5 of 5 seeds, at 3e-2 it matched full fine-tuning (few_labels_benchmark.py).
DEFAULT_LEARNING_RATE = {Method.FULL: 2e-5, Method.LORA: 2e-4, Method.QLORA: 2e-4, Method.IA3: 3e-2}
DEFAULT_BATCH_SIZE = 16
DEFAULT_EPOCHS = 3
DEFAULT_WARMUP_RATIO = 0.06
DEFAULT_WEIGHT_DECAY = 0.01
DEFAULT_MAX_SEQUENCE_LENGTH = 128
DEFAULT_SEED = 42
DEFAULT_LOG_EVERY = 10
DEFAULT_LORA_RANK = 8
DEFAULT_LORA_DROPOUT = 0.1
DEFAULT_MAX_FAILURES = 2
DEFAULT_AUGMENTATION_PROBABILITY = 0.1
MAX_AUGMENTATION_COPIES = 16
MAX_ADVERSARIAL_EPSILON = 100.0
# Each paraphrase costs a generation: a few copies at most.
MAX_PARAPHRASE_COPIES = 8
# Pruning and distillation (issue 23's slimmer models).
MAX_PRUNED_LAYERS = 256
MIN_EMBEDDING_SIZE = 16
MAX_EMBEDDING_SIZE = 65536
MIN_INTERMEDIATE_SIZE = 16
MAX_INTERMEDIATE_SIZE = 1 << 20
DEFAULT_DISTILLATION_TEMPERATURE = 2.0
MAX_DISTILLATION_TEMPERATURE = 20.0
# Most of the loss from the teacher, as distillation set-ups usually weigh it; on MiniLM's 3-layer student
# (distillation_benchmark.py) it gained 0.3 points of imdb accuracy over the labels alone, within the noise.
DEFAULT_DISTILLATION_WEIGHT = 0.9
# Matching the last layer's first token as well: +1.9 points in a trial outside the service's loop, -0.1 in the
# benchmark's run through it, so no clear effect on that data. On by default as TinyBERT and MiniLM distil hidden
# states; it costs no measurable time (the teacher's states are cached, 191 s against 193 s without).
DEFAULT_HIDDEN_WEIGHT = 1.0
MAX_HIDDEN_WEIGHT = 100.0

# Upper bounds that catch typos (a batch of 10^6) before they reach a worker; not capacity limits.
MAX_BATCH_SIZE = 8192
MAX_EPOCHS = 1000
MAX_SEQUENCE_LENGTH = 32768
MAX_ACCUMULATION = 4096
MAX_LORA_RANK = 4096
MAX_WORKERS = 4096
MAX_TRIALS = 1000
MAX_TAGS = 64
MAX_CHAT_TEMPLATE_CHARS = 65536
MAX_DPO_BETA = 10.0
# spec.json_match_keys: each key becomes part of a metric name (json_match_<key>), so it is a plain identifier.
MAX_JSON_MATCH_KEYS = 16
MAX_JSON_MATCH_KEY_CHARS = 64
_JSON_MATCH_KEY = re.compile(r"[A-Za-z0-9_]+")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$")


@dataclass(frozen=True)
class EarlyStopping:
    # 0 disables early stopping.
    patience: int = 0
    metric: str = "f1"
    goal: Goal = Goal.MAXIMIZE
    min_delta: float = 0.0


@dataclass(frozen=True)
class FewLabels:
    """Techniques for training classifiers on few labels (``ml.augment``, ``ml.adversarial``); all off by default."""

    # Extra rule-edited copies of each train example (0: none), and the share of words each edit touches.
    augmentation_copies: int = 0
    augmentation_probability: float = DEFAULT_AUGMENTATION_PROBABILITY
    # FGM on the input embeddings: the perturbation's L2 norm per sequence (0: off).
    adversarial_epsilon: float = 0.0
    # Extra copies of each train example paraphrased by ``paraphrase_model`` (a causal LM with a chat template).
    paraphrase_copies: int = 0
    paraphrase_model: BaseModelRef | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.augmentation_copies or self.adversarial_epsilon or self.paraphrase_copies)


@dataclass(frozen=True)
class Pruning:
    """Structured pruning of a BERT-family classifier before training (``ml.slimming``): encoder layers kept, the
    embeddings' width and the feed-forward neurons kept per layer (each 0: unchanged)."""

    layers: int = 0
    embedding_size: int = 0
    intermediate_size: int = 0


@dataclass(frozen=True)
class Distillation:
    """Knowledge distillation from ``teacher`` (a classifier over the same labels): the loss mixes the labels'
    cross-entropy and the softened teacher's (``ml.distillation``)."""

    teacher: BaseModelRef
    temperature: float = DEFAULT_DISTILLATION_TEMPERATURE
    weight: float = DEFAULT_DISTILLATION_WEIGHT
    # Matching the last layer's first-token representation; None: the default, decided when the spec is resolved
    # (DEFAULT_HIDDEN_WEIGHT when the teacher's hidden size is the model's, else 0).
    hidden_weight: float | None = None


@dataclass(frozen=True)
class HyperParameters:
    learning_rate: float
    per_worker_batch_size: int = DEFAULT_BATCH_SIZE
    epochs: int = DEFAULT_EPOCHS
    # None: no limit besides epochs.
    max_steps: int | None = None
    warmup_ratio: float = DEFAULT_WARMUP_RATIO
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    schedule: Schedule = Schedule.LINEAR
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    gradient_accumulation_steps: int = 1
    mixed_precision: Precision = Precision.AUTO
    seed: int = DEFAULT_SEED
    # 0: once per epoch.
    eval_every_steps: int = 0
    log_every_steps: int = DEFAULT_LOG_EVERY
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    few_labels: FewLabels = field(default_factory=FewLabels)
    # Recompute block activations in the backward pass (``ml.modeling.enable_gradient_checkpointing``).
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class Resources:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # 0 when not use_gpu.
    gpus_per_worker: float = 0.0
    max_failures: int = DEFAULT_MAX_FAILURES
    # Shard the model over the workers (FSDP2) instead of a copy in each (``ml.sharding``).
    fsdp: bool = False


@dataclass(frozen=True)
class SearchDimension:
    parameter: str
    distribution: Distribution
    low: float = 0.0
    high: float = 0.0
    values: tuple[float, ...] = ()


@dataclass(frozen=True)
class SearchSettings:
    num_trials: int
    max_concurrent_trials: int
    metric: str
    goal: Goal
    scheduler: Scheduler
    dimensions: tuple[SearchDimension, ...]


@dataclass(frozen=True)
class JobSpec:
    display_name: str
    base_model: BaseModelRef
    dataset: DatasetRef
    task: TaskType
    method: Method
    lora: LoraSettings | None
    hyper_parameters: HyperParameters
    resources: Resources
    search: SearchSettings | None = None
    registered_model_name: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    # None: the dataset version's (filled in when the spec is resolved).
    objective: Objective | None = None
    # SFT and DPO: the Jinja chat template; the resolved spec carries the one the job trains with (the spec's, else
    # the base tokenizer's), so a resumed or repeated run renders exactly the same tokens.
    chat_template: str = ""
    # DPO only: the loss's settings; None with other objectives (the resolved spec of a DPO job carries the defaults).
    dpo: DpoSettings | None = None
    # LORA with a generative objective: the artifact also holds the merged model under merged/.
    publish_merged: bool = False
    # SFT and DPO: top-level JSON keys whose values the generation evaluation compares (test json_match_<key>).
    json_match_keys: tuple[str, ...] = ()
    # CLASSIFY: the base model cut smaller before training; None: trained whole.
    pruning: Pruning | None = None
    # CLASSIFY: the loss also learns a teacher's predictions; None: the labels only.
    distillation: Distillation | None = None
    # SFT and DPO: a chat version whose test split the generation evaluation replies to (None: the job's own).
    evaluation_dataset: DatasetRef | None = None

    @property
    def project_id(self) -> str:
        return self.dataset.project_id


# --------------------------------------------------------------------------- builders (defaults + ranges)


def _bad(field_name: str, problem: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"spec.{field_name} {problem}", details={"field": f"spec.{field_name}"})


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise _bad(name, f"must be a finite number (got {value})")
    return value


def _int_range(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise _bad(name, f"must be between {low} and {high} (got {value})")
    return value


def build_base_model(
    *, name: str = "", object_prefix: str = "", local_path: str = "", field_name: str = "base_model"
) -> BaseModelRef:
    """``field_name``: the spec field holding the reference (``distillation.teacher`` is one too)."""
    given = [v for v in (name, object_prefix, local_path) if v]
    if not given:
        raise _bad(
            field_name,
            "is required: set base_model_name, object_prefix (a Hugging Face directory in the object store) "
            "or local_path",
        )
    if name:
        validate_id(name, what=f"spec.{field_name}.base_model_name")
    return BaseModelRef(
        name=name, object_prefix=object_prefix.strip("/") if object_prefix else "", local_path=local_path
    )


def build_dataset(*, project_id: str, dataset_version_id: str, field_name: str = "dataset_version") -> DatasetRef:
    """``field_name``: the spec field holding the reference (``evaluation_dataset_version`` is one too)."""
    if not project_id or not dataset_version_id:
        raise _bad(field_name, "is required: set project_id and dataset_version_id")
    validate_id(project_id, what=f"spec.{field_name}.project_id")
    validate_id(dataset_version_id, what=f"spec.{field_name}.dataset_version_id")
    return DatasetRef(project_id=project_id, dataset_version_id=dataset_version_id)


def build_lora(
    *,
    method: Method,
    given: bool,
    rank: int = 0,
    alpha: float = 0.0,
    dropout: float | None = None,
    target_modules: Sequence[str] = (),
) -> LoraSettings | None:
    if not method.adapters:
        if given:
            raise _bad("lora", "is only valid with method LORA; remove it or set method to TRAINING_METHOD_LORA")
        return None
    rank = rank or DEFAULT_LORA_RANK
    _int_range("lora.rank", rank, 1, MAX_LORA_RANK)
    alpha = _finite("lora.alpha", alpha) or 2.0 * rank
    if alpha <= 0:
        raise _bad("lora.alpha", f"must be > 0 (got {alpha})")
    dropout = DEFAULT_LORA_DROPOUT if dropout is None else _finite("lora.dropout", dropout)
    if not 0.0 <= dropout < 1.0:
        raise _bad("lora.dropout", f"must be in [0, 1) (got {dropout})")
    modules: list[str] = []
    for module in target_modules:
        if not _MODULE_NAME.fullmatch(module):
            raise _bad("lora.target_modules", f"has an invalid module name {module[:80]!r}")
        if module not in modules:
            modules.append(module)
    return LoraSettings(
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=tuple(modules),
        quantize_base=method is Method.QLORA,
    )


def build_dpo(*, given: bool, beta: float = 0.0, loss: DpoLoss | None = None) -> DpoSettings | None:
    """``spec.dpo``: None when not given (a DPO job gets the defaults when its spec is resolved); beta 0 means 0.1,
    no loss the sigmoid one."""
    if not given:
        return None
    beta = _finite("dpo.beta", beta) or DpoSettings().beta
    if not 0.0 < beta <= MAX_DPO_BETA:
        raise _bad("dpo.beta", f"must be in (0, {MAX_DPO_BETA:g}] (got {beta})")
    return DpoSettings(beta=beta, loss=loss or DpoLoss.SIGMOID)


def build_json_match_keys(keys: Sequence[str]) -> tuple[str, ...]:
    """``spec.json_match_keys``: distinct identifiers (each names a metric, ``json_match_<key>``), at most 16."""
    name = "json_match_keys"
    rule = (
        f"a key is 1-{MAX_JSON_MATCH_KEY_CHARS} letters, digits or underscores (a top-level key of the JSON replies; "
        "it names the test metric json_match_<key>)"
    )
    if len(keys) > MAX_JSON_MATCH_KEYS:
        raise _bad(name, f"has {len(keys)} keys; the limit is {MAX_JSON_MATCH_KEYS}")
    seen: set[str] = set()
    for index, key in enumerate(keys):
        if not key:
            raise _bad(name, f"entry {index} is empty; {rule}")
        if len(key) > MAX_JSON_MATCH_KEY_CHARS:
            raise _bad(name, f"entry {index} ({key[:40]!r}...) is {len(key)} characters long; {rule}")
        if not _JSON_MATCH_KEY.fullmatch(key):
            raise _bad(name, f"entry {index} {key!r} is not a valid key; {rule}")
        if key in seen:
            raise _bad(name, f"names {key!r} more than once; list each key once")
        seen.add(key)
    return tuple(keys)


def is_test_only_metric(metric: str) -> bool:
    return metric in TEST_ONLY_METRICS or metric.startswith(JSON_MATCH_METRIC_PREFIX)


def _validation_metric(field_name: str, metric: str) -> str:
    if is_test_only_metric(metric):
        raise _bad(
            field_name,
            f"{metric[:80]!r} is measured on the test split only, once training ended, so it cannot steer training; "
            f"use one of {', '.join(VALIDATION_METRICS)}",
        )
    if metric not in VALIDATION_METRICS:
        raise _bad(
            field_name, f"{metric[:40]!r} is not a validation metric; use one of {', '.join(VALIDATION_METRICS)}"
        )
    return metric


def build_early_stopping(
    *, patience: int = 0, metric: str = "", goal: Goal | None = None, min_delta: float = 0.0
) -> EarlyStopping:
    _int_range("hyper_parameters.early_stopping.patience", patience, 0, 10_000)
    metric = _validation_metric("hyper_parameters.early_stopping.metric", metric or DEFAULT_VALIDATION_METRIC)
    if goal is None:
        goal = Goal.MINIMIZE if metric in MINIMIZED_METRICS else Goal.MAXIMIZE
    min_delta = _finite("hyper_parameters.early_stopping.min_delta", min_delta)
    if min_delta < 0:
        raise _bad("hyper_parameters.early_stopping.min_delta", f"must be >= 0 (got {min_delta})")
    return EarlyStopping(patience=patience, metric=metric, goal=goal, min_delta=min_delta)


def build_hyper_parameters(
    *,
    method: Method,
    learning_rate: float = 0.0,
    per_worker_batch_size: int = 0,
    epochs: int = 0,
    max_steps: int | None = None,
    warmup_ratio: float | None = None,
    weight_decay: float | None = None,
    schedule: Schedule | None = None,
    max_sequence_length: int = 0,
    gradient_accumulation_steps: int = 0,
    mixed_precision: Precision = Precision.AUTO,
    seed: int | None = None,
    eval_every_steps: int = 0,
    log_every_steps: int = 0,
    early_stopping: EarlyStopping | None = None,
    few_labels: FewLabels | None = None,
    gradient_checkpointing: bool = False,
) -> HyperParameters:
    p = "hyper_parameters."
    learning_rate = _finite(p + "learning_rate", learning_rate) or DEFAULT_LEARNING_RATE[method]
    if not 0 < learning_rate <= 1.0:
        raise _bad(p + "learning_rate", f"must be in (0, 1] (got {learning_rate})")
    batch = _int_range(p + "per_worker_batch_size", per_worker_batch_size or DEFAULT_BATCH_SIZE, 1, MAX_BATCH_SIZE)
    epochs = _int_range(p + "epochs", epochs or DEFAULT_EPOCHS, 1, MAX_EPOCHS)
    if max_steps is not None and max_steps < 1:
        raise _bad(p + "max_steps", f"must be >= 1 when set (got {max_steps})")
    warmup = DEFAULT_WARMUP_RATIO if warmup_ratio is None else _finite(p + "warmup_ratio", warmup_ratio)
    if not 0.0 <= warmup < 1.0:
        raise _bad(p + "warmup_ratio", f"must be in [0, 1) (got {warmup})")
    decay = DEFAULT_WEIGHT_DECAY if weight_decay is None else _finite(p + "weight_decay", weight_decay)
    if not 0.0 <= decay <= 1.0:
        raise _bad(p + "weight_decay", f"must be in [0, 1] (got {decay})")
    length = _int_range(
        p + "max_sequence_length", max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH, 8, MAX_SEQUENCE_LENGTH
    )
    accumulation = _int_range(p + "gradient_accumulation_steps", gradient_accumulation_steps or 1, 1, MAX_ACCUMULATION)
    if seed is not None and not 0 <= seed < 2**32:
        raise _bad(p + "seed", f"must be in [0, 2^32) (got {seed})")
    if eval_every_steps < 0:
        raise _bad(p + "eval_every_steps", f"must be >= 0 (got {eval_every_steps})")
    if log_every_steps < 0:
        raise _bad(p + "log_every_steps", f"must be >= 0 (got {log_every_steps})")
    return HyperParameters(
        learning_rate=learning_rate,
        per_worker_batch_size=batch,
        epochs=epochs,
        max_steps=max_steps,
        warmup_ratio=warmup,
        weight_decay=decay,
        schedule=schedule or Schedule.LINEAR,
        max_sequence_length=length,
        gradient_accumulation_steps=accumulation,
        mixed_precision=mixed_precision,
        seed=DEFAULT_SEED if seed is None else seed,
        eval_every_steps=eval_every_steps,
        log_every_steps=log_every_steps or DEFAULT_LOG_EVERY,
        early_stopping=early_stopping or build_early_stopping(),
        few_labels=few_labels or FewLabels(),
        gradient_checkpointing=gradient_checkpointing,
    )


def build_pruning(
    *, given: bool, layers: int = 0, embedding_size: int = 0, intermediate_size: int = 0
) -> Pruning | None:
    """None when not given or when it cuts nothing; the model's own bounds are checked when it is resolved."""
    if not given:
        return None
    layers = _int_range("pruning.layers", layers, 0, MAX_PRUNED_LAYERS)
    if embedding_size:
        embedding_size = _int_range("pruning.embedding_size", embedding_size, MIN_EMBEDDING_SIZE, MAX_EMBEDDING_SIZE)
    if intermediate_size:
        intermediate_size = _int_range(
            "pruning.intermediate_size", intermediate_size, MIN_INTERMEDIATE_SIZE, MAX_INTERMEDIATE_SIZE
        )
    if not layers and not embedding_size and not intermediate_size:
        return None
    return Pruning(layers=layers, embedding_size=embedding_size, intermediate_size=intermediate_size)


def build_distillation(
    *,
    given: bool,
    teacher: BaseModelRef | None = None,
    temperature: float = 0.0,
    weight: float | None = None,
    hidden_weight: float | None = None,
) -> Distillation | None:
    if not given:
        return None
    if teacher is None:
        raise _bad(
            "distillation.teacher",
            "is required: the classifier to learn from (a registered version's artifacts are object_prefix "
            "models/<model>/<version>)",
        )
    temperature = _finite("distillation.temperature", temperature) or DEFAULT_DISTILLATION_TEMPERATURE
    if not 0.0 < temperature <= MAX_DISTILLATION_TEMPERATURE:
        raise _bad("distillation.temperature", f"must be in (0, {MAX_DISTILLATION_TEMPERATURE:g}] (got {temperature})")
    weight = DEFAULT_DISTILLATION_WEIGHT if weight is None else _finite("distillation.weight", weight)
    if not 0.0 <= weight <= 1.0:
        raise _bad("distillation.weight", f"must be in [0, 1] (got {weight})")
    if hidden_weight is not None:
        hidden_weight = _finite("distillation.hidden_weight", hidden_weight)
        if not 0.0 <= hidden_weight <= MAX_HIDDEN_WEIGHT:
            raise _bad("distillation.hidden_weight", f"must be in [0, {MAX_HIDDEN_WEIGHT:g}] (got {hidden_weight})")
    return Distillation(teacher=teacher, temperature=temperature, weight=weight, hidden_weight=hidden_weight)


def build_few_labels(
    *,
    augmentation_copies: int = 0,
    augmentation_probability: float | None = None,
    adversarial_epsilon: float = 0.0,
    paraphrase_copies: int = 0,
    paraphrase_model: BaseModelRef | None = None,
) -> FewLabels:
    p = "hyper_parameters.few_labels."
    copies = _int_range(p + "augmentation_copies", augmentation_copies, 0, MAX_AUGMENTATION_COPIES)
    probability = (
        DEFAULT_AUGMENTATION_PROBABILITY
        if augmentation_probability is None
        else _finite(p + "augmentation_probability", augmentation_probability)
    )
    if not 0.0 < probability <= 0.5:
        raise _bad(p + "augmentation_probability", f"must be in (0, 0.5] (got {probability})")
    if augmentation_probability is not None and not copies:
        raise _bad(p + "augmentation_probability", "is only used with augmentation_copies >= 1; set both or neither")
    epsilon = _finite(p + "adversarial_epsilon", adversarial_epsilon)
    if not 0.0 <= epsilon <= MAX_ADVERSARIAL_EPSILON:
        raise _bad(p + "adversarial_epsilon", f"must be between 0 (off) and {MAX_ADVERSARIAL_EPSILON} (got {epsilon})")
    paraphrases = _int_range(p + "paraphrase_copies", paraphrase_copies, 0, MAX_PARAPHRASE_COPIES)
    if paraphrases and paraphrase_model is None:
        raise _bad(
            p + "paraphrase_model",
            "is required with paraphrase_copies: the generative model that paraphrases (a causal language model with "
            "a chat template, e.g. base_model_name smollm2-135m-instruct)",
        )
    if paraphrase_model is not None and not paraphrases:
        raise _bad(p + "paraphrase_model", "is only used with paraphrase_copies >= 1; set both or neither")
    return FewLabels(copies, probability, epsilon, paraphrases, paraphrase_model)


def build_resources(
    *,
    num_workers: int = 0,
    use_gpu: bool = False,
    cpus_per_worker: float = 0.0,
    gpus_per_worker: float = 0.0,
    max_failures: int | None = None,
    fsdp: bool = False,
) -> Resources:
    p = "resources."
    workers = _int_range(p + "num_workers", num_workers or 1, 1, MAX_WORKERS)
    if fsdp and workers < 2:
        raise _bad(
            p + "fsdp",
            f"shards the model over the workers, so it needs resources.num_workers >= 2 (got {workers}); set "
            "num_workers or remove fsdp",
        )
    cpus = _finite(p + "cpus_per_worker", cpus_per_worker) or 1.0
    if cpus <= 0:
        raise _bad(p + "cpus_per_worker", f"must be > 0 (got {cpus})")
    gpus = _finite(p + "gpus_per_worker", gpus_per_worker)
    if gpus and not use_gpu:
        raise _bad(p + "gpus_per_worker", "is only valid with use_gpu; set use_gpu or remove it")
    if gpus < 0:
        raise _bad(p + "gpus_per_worker", f"must be >= 0 (got {gpus})")
    if use_gpu and not gpus:
        gpus = 1.0
    failures = DEFAULT_MAX_FAILURES if max_failures is None else max_failures
    _int_range(p + "max_failures", failures, 0, 100)
    return Resources(
        num_workers=workers,
        use_gpu=use_gpu,
        cpus_per_worker=cpus,
        gpus_per_worker=gpus,
        max_failures=failures,
        fsdp=fsdp,
    )


# Searchable parameters and whether they take integers.
SEARCHABLE = {
    "learning_rate": False,
    "weight_decay": False,
    "warmup_ratio": False,
    "per_worker_batch_size": True,
    "lora.rank": True,
    "lora.alpha": False,
    "lora.dropout": False,
    # Objective dpo only (checked once the objective is known).
    "dpo.beta": False,
}


def build_search_dimension(
    index: int,
    *,
    parameter: str,
    distribution: Distribution | None,
    low: float = 0.0,
    high: float = 0.0,
    values: Sequence[float] = (),
    method: Method,
) -> SearchDimension:
    name = f"search.dimensions[{index}]"
    if parameter not in SEARCHABLE:
        raise _bad(
            f"{name}.parameter",
            f"{parameter[:60]!r} is not a searchable hyper-parameter; use one of {', '.join(SEARCHABLE)}",
        )
    if parameter.startswith("lora.") and not method.adapters:
        raise _bad(f"{name}.parameter", f"{parameter!r} can only be searched with method LORA")
    if distribution is None:
        raise _bad(f"{name}", "needs a domain: uniform, log_uniform or choice")
    if distribution is Distribution.CHOICE:
        if not values:
            raise _bad(f"{name}.choice.values", "must not be empty")
        for v in values:
            _finite(f"{name}.choice.values", v)
            if SEARCHABLE[parameter] and v != int(v):
                raise _bad(f"{name}.choice.values", f"must be integers for {parameter} (got {v})")
        return SearchDimension(parameter, distribution, values=tuple(values))
    low, high = _finite(f"{name}.min", low), _finite(f"{name}.max", high)
    if not low < high:
        raise _bad(f"{name}", f"needs min < max (got min {low}, max {high})")
    if distribution is Distribution.LOG_UNIFORM and low <= 0:
        raise _bad(f"{name}.min", f"must be > 0 for log_uniform (got {low})")
    return SearchDimension(parameter, distribution, low=low, high=high)


def build_search(
    *,
    num_trials: int,
    max_concurrent_trials: int = 0,
    metric: str = "",
    goal: Goal | None = None,
    scheduler: Scheduler | None = None,
    dimensions: Sequence[SearchDimension],
) -> SearchSettings:
    _int_range("search.num_trials", num_trials, 1, MAX_TRIALS)
    if max_concurrent_trials < 0:
        raise _bad("search.max_concurrent_trials", f"must be >= 0 (got {max_concurrent_trials})")
    metric = _validation_metric("search.metric", metric or DEFAULT_VALIDATION_METRIC)
    if not dimensions:
        raise _bad("search.dimensions", "must name at least one hyper-parameter to search")
    names = [d.parameter for d in dimensions]
    if len(set(names)) != len(names):
        raise _bad("search.dimensions", "names a hyper-parameter more than once")
    if goal is None:
        goal = Goal.MINIMIZE if metric in MINIMIZED_METRICS else Goal.MAXIMIZE
    return SearchSettings(
        num_trials=num_trials,
        max_concurrent_trials=max_concurrent_trials,
        metric=metric,
        goal=goal,
        scheduler=scheduler or Scheduler.ASHA,
        dimensions=tuple(dimensions),
    )


def build_spec(
    *,
    display_name: str,
    base_model: BaseModelRef,
    dataset: DatasetRef,
    task: TaskType,
    method: Method,
    lora: LoraSettings | None,
    hyper_parameters: HyperParameters,
    resources: Resources,
    search: SearchSettings | None,
    registered_model_name: str,
    tags: Mapping[str, str],
    objective: Objective | None = None,
    chat_template: str = "",
    publish_merged: bool = False,
    dpo: DpoSettings | None = None,
    json_match_keys: Sequence[str] = (),
    pruning: Pruning | None = None,
    distillation: Distillation | None = None,
    evaluation_dataset: DatasetRef | None = None,
) -> JobSpec:
    """Cross-field rules, once every part was built. What needs the dataset version (the objective's task type
    when the spec names neither, the chat template of the base model) is checked when the spec is resolved."""
    if len(display_name) > 256:
        raise _bad("display_name", f"is {len(display_name)} characters long; the limit is 256")
    if objective is not None and objective.value not in available_objectives():
        raise objective_not_available(objective, "spec.objective")
    if task is not TaskType.UNSPECIFIED:
        # Imported here: the task modules load their libraries lazily, but the registry is the service's.
        from gristmill.training.tasks import TRAINING_TASKS

        if task.value not in TRAINING_TASKS:
            implied = default_objective(task)
            if objective is None and implied is not None:
                raise objective_not_available(implied, f"spec.task {task.value}")
            raise _bad("task", f"{task.value} is not supported yet; supported: {', '.join(TRAINING_TASKS.names())}")
        if objective is not None and task not in OBJECTIVE_TASK_TYPES[objective]:
            raise _bad(
                "objective",
                f"{objective.value} does not train {task.value} datasets; it trains "
                f"{', '.join(sorted(t.value for t in OBJECTIVE_TASK_TYPES[objective]))} (leave the objective unset "
                "to use the task's)",
            )
    if len(chat_template) > MAX_CHAT_TEMPLATE_CHARS:
        raise _bad("chat_template", f"is {len(chat_template)} characters long; the limit is {MAX_CHAT_TEMPLATE_CHARS}")
    known = objective or (default_objective(task) if task is not TaskType.UNSPECIFIED else None)
    if chat_template and known is Objective.CLASSIFY:
        raise _bad("chat_template", "is only used by chat objectives (sft, dpo); remove it for a classification job")
    if dpo is not None and known is not None and known is not Objective.DPO:
        raise dpo_without_dpo(known)
    check_method_objective(method, publish_merged, known, resources)
    check_compression(method, pruning, distillation, known)
    if known is not None:
        check_few_labels(hyper_parameters.few_labels, known)
        check_search_objective(search, known)
    if json_match_keys and known is not None:
        check_json_match_keys(known)
    if evaluation_dataset is not None and known is not None:
        check_evaluation_dataset(known)
    if registered_model_name:
        validate_id(registered_model_name, what="spec.registered_model_name")
    if len(tags) > MAX_TAGS:
        raise _bad("tags", f"has {len(tags)} entries; the limit is {MAX_TAGS}")
    for key, value in tags.items():
        if not key or len(key) > 128 or len(value) > 1024:
            raise _bad("tags", f"entry {key[:40]!r} is invalid: keys are 1-128 characters, values at most 1024")
    precision = hyper_parameters.mixed_precision
    if precision is Precision.FP16 and not resources.use_gpu:
        raise _bad(
            "hyper_parameters.mixed_precision",
            "FP16 needs GPU workers (resources.use_gpu); on CPU use BF16 or NO",
        )
    return JobSpec(
        display_name=display_name,
        base_model=base_model,
        dataset=dataset,
        task=task,
        method=method,
        lora=lora,
        hyper_parameters=hyper_parameters,
        resources=resources,
        search=search,
        registered_model_name=registered_model_name,
        tags=dict(tags),
        objective=objective,
        chat_template=chat_template,
        publish_merged=publish_merged,
        dpo=dpo,
        json_match_keys=tuple(json_match_keys),
        pruning=pruning,
        distillation=distillation,
        evaluation_dataset=evaluation_dataset,
    )


def check_compression(
    method: Method, pruning: Pruning | None, distillation: Distillation | None, objective: Objective | None
) -> None:
    """Pruning and distillation make smaller classifiers (``objective`` None: not known yet, the resolver checks
    again); pruning cuts the whole model, so it trains every weight (method FULL)."""
    for name, value in (("pruning", pruning), ("distillation", distillation)):
        if value is not None and objective is not None and objective is not Objective.CLASSIFY:
            raise _bad(name, f"is only for objective classify, not {objective.value}; remove it")
    if pruning is not None and method is not Method.FULL:
        raise _bad(
            "pruning",
            f"retrains every weight of the cut model, so it needs method TRAINING_METHOD_FULL (not {method.value})",
        )


def check_few_labels(few_labels: FewLabels, objective: Objective) -> None:
    """Augmentation and adversarial training edit and perturb classification inputs; chat objectives have neither."""
    if few_labels.enabled and objective is not Objective.CLASSIFY:
        raise _bad(
            "hyper_parameters.few_labels",
            f"is only for objective classify (its augmentation and adversarial training act on texts to label), not "
            f"{objective.value}; remove it",
        )


def check_method_objective(
    method: Method, publish_merged: bool, objective: Objective | None, resources: Resources | None = None
) -> None:
    """QLoRA and ``publish_merged`` are for generative objectives' LoRA adapters (``objective`` None: not known yet,
    the resolver checks again with the dataset version's); QLoRA needs GPU workers (``resources``)."""
    generative = ", ".join(sorted(o.value for o in GENERATIVE_OBJECTIVES))
    if method is Method.QLORA and objective is not None and objective not in GENERATIVE_OBJECTIVES:
        raise _bad(
            "method",
            f"TRAINING_METHOD_QLORA trains adapters of generative models ({generative}), not objective "
            f"{objective.value}; use TRAINING_METHOD_LORA",
        )
    if method is Method.IA3 and objective is not None and objective is not Objective.CLASSIFY:
        raise _bad(
            "method",
            f"TRAINING_METHOD_IA3 trains classifiers (objective classify), not objective {objective.value}; use "
            "TRAINING_METHOD_LORA",
        )
    if publish_merged and method is not Method.LORA:
        why = {
            Method.FULL: "publishes the full model already",
            Method.QLORA: "trains over a quantised base",
            Method.IA3: "trains classifiers only",
        }
        raise _bad(
            "publish_merged",
            "needs method TRAINING_METHOD_LORA (it merges the trained adapter into the base weights); method "
            f"{method.value} {why[method]}",
        )
    if publish_merged and objective is not None and objective not in GENERATIVE_OBJECTIVES:
        raise _bad(
            "publish_merged",
            f"is only for generative objectives ({generative}), whose artifact is the adapter; objective "
            f"{objective.value} publishes its LoRA adapters merged into the weights already",
        )
    if method is Method.QLORA and resources is not None and not resources.use_gpu:
        raise qlora_needs_gpus("the job asks for no GPU workers (resources.use_gpu is false)")
    if resources is not None and resources.fsdp:
        check_fsdp(method, objective)


def check_search_objective(search: SearchSettings | None, objective: Objective) -> None:
    """``dpo.beta`` is searched for DPO jobs only."""
    searched = {dimension.parameter for dimension in search.dimensions} if search is not None else set()
    if "dpo.beta" in searched and objective is not Objective.DPO:
        raise _bad(
            "search.dimensions",
            f"searches dpo.beta, which only objective dpo has; objective {objective.value} does not (remove it)",
        )


def check_fsdp(method: Method, objective: Objective | None) -> None:
    """FSDP shards sft jobs' full or LoRA training (``objective`` None: not known yet, the resolver checks again)."""
    if method not in (Method.FULL, Method.LORA):
        raise _bad(
            "resources.fsdp",
            f"shards full fine-tuning and LoRA; method {method.value} is not sharded (QLoRA's 4-bit base cannot be "
            "split this way): use TRAINING_METHOD_LORA with fsdp, or remove fsdp",
        )
    if objective is not None and objective is not Objective.SFT:
        raise _bad(
            "resources.fsdp",
            f"shards sft jobs only; objective {objective.value} trains a whole copy per worker (remove fsdp)",
        )


def check_generative_field(field_name: str, what: str, objective: Objective) -> None:
    """A field for generated replies (``what`` it is, e.g. "scores generated replies"): generative objectives only."""
    if objective not in GENERATIVE_OBJECTIVES:
        generative = ", ".join(sorted(o.value for o in GENERATIVE_OBJECTIVES))
        raise _bad(
            field_name,
            f"{what}, so it is only for generative objectives ({generative}); objective {objective.value} generates "
            "no text: remove it",
        )


def check_json_match_keys(objective: Objective) -> None:
    check_generative_field("json_match_keys", "scores generated replies", objective)


def check_evaluation_dataset(objective: Objective) -> None:
    check_generative_field(
        "evaluation_dataset_version", "is the conversations the generation evaluation replies to", objective
    )


def qlora_needs_gpus(why: str) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"spec.method TRAINING_METHOD_QLORA needs CUDA GPUs (bitsandbytes 4-bit kernels) and {why}; set "
        "resources.use_gpu on a cluster with GPUs, or use TRAINING_METHOD_LORA (no quantisation, runs on CPU)",
        details={"field": "spec.method"},
    )


def dpo_without_dpo(objective: Objective) -> InvalidArgumentError:
    return _bad(
        "dpo", f"is only used by objective dpo, not {objective.value}; remove it, or train a preference version"
    )


def flatten_hyper_parameters(spec: JobSpec) -> dict[str, str]:
    """The effective hyper-parameters as a flat string map (lineage, model card)."""
    hp = spec.hyper_parameters
    es = hp.early_stopping
    flat = {
        "method": spec.method.value,
        "learning_rate": repr(hp.learning_rate),
        "per_worker_batch_size": str(hp.per_worker_batch_size),
        "epochs": str(hp.epochs),
        "max_steps": "" if hp.max_steps is None else str(hp.max_steps),
        "warmup_ratio": repr(hp.warmup_ratio),
        "weight_decay": repr(hp.weight_decay),
        "learning_rate_schedule": hp.schedule.value,
        "max_sequence_length": str(hp.max_sequence_length),
        "gradient_accumulation_steps": str(hp.gradient_accumulation_steps),
        "gradient_checkpointing": str(hp.gradient_checkpointing).lower(),
        "mixed_precision": hp.mixed_precision.value,
        "seed": str(hp.seed),
        "eval_every_steps": str(hp.eval_every_steps),
        "early_stopping.patience": str(es.patience),
        "early_stopping.metric": es.metric,
        "early_stopping.goal": es.goal.value,
        "num_workers": str(spec.resources.num_workers),
        "use_gpu": str(spec.resources.use_gpu).lower(),
        "fsdp": str(spec.resources.fsdp).lower(),
    }
    if spec.lora is not None:
        flat.update(
            {
                "lora.rank": str(spec.lora.rank),
                "lora.alpha": repr(spec.lora.alpha),
                "lora.dropout": repr(spec.lora.dropout),
                "lora.target_modules": ",".join(spec.lora.target_modules),
            }
        )
    if not flat["max_steps"]:
        del flat["max_steps"]
    if spec.objective is not None:
        flat["objective"] = spec.objective.value
    if spec.chat_template:
        # Serving applies the template training used; the hash lets it refuse another one.
        flat[LINEAGE_KEY] = chat_template_sha256(spec.chat_template)
    if spec.publish_merged:
        flat["publish_merged"] = "true"
    if spec.dpo is not None:
        flat["dpo.beta"] = repr(spec.dpo.beta)
        flat["dpo.loss"] = spec.dpo.loss.value
    if spec.pruning is not None:
        flat["pruning.layers"] = str(spec.pruning.layers)
        flat["pruning.embedding_size"] = str(spec.pruning.embedding_size)
        flat["pruning.intermediate_size"] = str(spec.pruning.intermediate_size)
    if spec.distillation is not None:
        flat["distillation.teacher"] = model_source(spec.distillation.teacher)
        flat["distillation.teacher.content_sha256"] = spec.distillation.teacher.content_sha256
        flat["distillation.temperature"] = repr(spec.distillation.temperature)
        flat["distillation.weight"] = repr(spec.distillation.weight)
        if spec.distillation.hidden_weight is not None:
            flat["distillation.hidden_weight"] = repr(spec.distillation.hidden_weight)
    if spec.evaluation_dataset is not None:
        ev = spec.evaluation_dataset
        flat["evaluation_dataset_version"] = f"{ev.project_id}/{ev.dataset_version_id}"
    few = hp.few_labels
    if few.augmentation_copies:
        flat["few_labels.augmentation_copies"] = str(few.augmentation_copies)
        flat["few_labels.augmentation_probability"] = repr(few.augmentation_probability)
    if few.adversarial_epsilon:
        flat["few_labels.adversarial_epsilon"] = repr(few.adversarial_epsilon)
    if few.paraphrase_copies and few.paraphrase_model is not None:
        flat["few_labels.paraphrase_copies"] = str(few.paraphrase_copies)
        flat["few_labels.paraphrase_model"] = model_source(few.paraphrase_model)
        flat["few_labels.paraphrase_model.content_sha256"] = few.paraphrase_model.content_sha256
    return flat


# The roles of the models a job uses besides its base (``side_models``).
TEACHER = "distillation teacher"
PARAPHRASER = "paraphrase model"


def side_models(spec: JobSpec) -> dict[str, BaseModelRef]:
    """The models ``spec`` uses besides its base, by role: each is resolved, verified and fetched as the base is."""
    out = {}
    if spec.distillation is not None:
        out[TEACHER] = spec.distillation.teacher
    few = spec.hyper_parameters.few_labels
    if few.paraphrase_copies and few.paraphrase_model is not None:
        out[PARAPHRASER] = few.paraphrase_model
    return out


def model_source(ref: BaseModelRef) -> str:
    """A model reference as the lineage records it: ``base_model_name:NAME``, ``object_prefix:PREFIX`` or
    ``local_path:PATH``."""
    if ref.name:
        return f"base_model_name:{ref.name}"
    if ref.object_prefix:
        return f"object_prefix:{ref.object_prefix}"
    return f"local_path:{ref.local_path}"
