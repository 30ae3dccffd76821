"""The training loop every Ray Train worker runs (``train_loop``), data-parallel over the worker group.

Per worker: tokenise once, build the model (full fine-tune or LoRA; what the model, a batch, its loss and
the evaluation metrics are is the job's task type's business, ``gristmill.training.tasks``), then optimise
with AdamW, warmup +
decay, gradient accumulation (``no_sync`` on the micro-steps that do not step), autocast where the
device supports it. Host syncs are rare on purpose: the loss stays on the device and is read only when
metrics are logged. Every evaluation all-reduces the task's totals, so every rank takes the same early
stopping decision, and reports a checkpoint (written by rank 0 only; ``ray.train.report`` is a barrier
every rank calls equally often). A restarted worker group resumes from ``ray.train.get_checkpoint()``.

At the end the best weights are evaluated on the test split (a task that generates text also replies to at most
``GENERATION_EXAMPLES`` test examples, every rank its share, and rank 0 keeps sample generations for the model
card) and rank 0 reports the final model as the run's last checkpoint, named ``model`` (what its files are is the
task's: a classifier with LoRA merged into it, a chat model's LoRA adapter; always with the tokenizer); the
service publishes it. With ``publish_merged`` the adapter is then folded into the base weights (in float32, cast
to the base checkpoint's dtype), that merged model is evaluated on the test split like the adapter was
(``merged_loss``, ...: a merge that changed the model shows) and saved under ``merged/``. Progress goes to a
``ProgressSink`` (rank 0 only) as it happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from gristmill.core import drift
from gristmill.core.manifests import FileEntry
from gristmill.core.settings import S3Settings
from gristmill.core.tasks import DEFAULT_TASK_TYPE
from gristmill.training.domain.dpo import DpoSettings
from gristmill.training.domain.lora import LoraSettings
from gristmill.training.domain.runs import LOOP_REPORT_FILE, LOOP_SAMPLES_FILE, MERGED_MODEL_DIR, SideModel
from gristmill.training.domain.runs import LOOP_STATE_FILE as STATE_FILE
from gristmill.training.domain.spec import (
    PARAPHRASER,
    TEACHER,
    Distillation,
    HyperParameters,
    Method,
    Precision,
    Pruning,
)
from gristmill.training.ml import data as D
from gristmill.training.ml.adversarial import EmbeddingAdversary
from gristmill.training.ml.augment import augment
from gristmill.training.ml.distillation import Teacher, teacher_outputs
from gristmill.training.ml.node_files import node_checkpoint, node_model_dir
from gristmill.training.runner.local_ray import process_started
from gristmill.training.tasks import job_training_task
from gristmill.training.tasks.base import GeneratesText, ProfilesPredictions, SampleGeneration

TRAINABLE_FILE = "trainable.safetensors"
BEST_FILE = "best.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
FINAL_CHECKPOINT_NAME = "model"
MAX_GRAD_NORM = 1.0
# Test examples a task that generates text replies to once training ended (over all ranks): bounds the cost.
GENERATION_EXAMPLES = 64

# When this module's imports (torch among them) were done in this process. On a Ray worker that lies between the
# process's start and Ray Train calling train_loop: the started record splits a slow start at it.
_IMPORTED_AT = time.time()


class ProgressSink(Protocol):
    """Where rank 0 sends progress records (dicts of plain values) while the job runs."""

    def push(self, record: dict[str, Any]) -> None: ...


@dataclass
class ListSink:
    """Collects records in memory (in-process runs and tests)."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def push(self, record: dict[str, Any]) -> None:
        self.records.append(record)


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: right after optimizer step ``at_step``, worker ``rank`` exits its process (``mode`` "exit",
    a crash; once per ``marker`` file, after ``settle_s`` seconds so that Ray has registered the previous
    checkpoint) or raises (``mode`` "raise", a bug in the loop; every time)."""

    rank: int
    at_step: int
    marker: str = ""
    settle_s: float = 5.0
    mode: str = "exit"


@dataclass(frozen=True)
class LoopConfig:
    job_id: str
    model_dir: str
    label_map: tuple[str, ...]
    # The task's examples per split (``TrainingTask.examples``).
    examples: dict[str, list[Any]]
    method: Method
    lora: LoraSettings | None
    hyper: HyperParameters
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    sink: ProgressSink | None = None
    fault: FaultInjection | None = None
    # Set for Ray Tune trials: metrics are reported to Tune every evaluation.
    trial: int | None = None
    # The task type (gristmill.core.tasks name or enum name): which objective the loop trains.
    task: str = DEFAULT_TASK_TYPE
    # Replaces the base tokenizer's chat template when set (the resolved spec's: the template the job trains with).
    chat_template: str = ""
    # DPO: the loss's settings (the resolved spec's).
    dpo: DpoSettings | None = None
    # LoRA, generative objective: also save the merged model under merged/ (evaluated on the test split).
    publish_merged: bool = False
    # Generative objectives: the top-level JSON keys the generation evaluation compares (json_match_<key>).
    json_match_keys: tuple[str, ...] = ()
    # Generative objectives: conversations (chat rows) the generation evaluation replies to instead of the test
    # split's examples (``spec.evaluation_dataset_version``); None: the test split's.
    generation_examples: Sequence[Any] | None = None
    # The base model's files in the object store, and the store: a worker on a node without ``model_dir`` fetches
    # them (``node_files.node_model_dir``). Empty / None: ``model_dir`` is read where the worker runs.
    model_files: Mapping[str, FileEntry] = field(default_factory=dict)
    model_store: S3Settings | None = None
    # Shard parameters, gradients and optimizer state over the workers (FSDP2) instead of DDP (``ml.sharding``).
    fsdp: bool = False
    # Classifiers: cut the base model smaller before training (``ml.slimming``).
    pruning: Pruning | None = None
    # Classifiers: learn the teacher's predictions too (``ml.distillation``).
    distillation: Distillation | None = None
    # The models besides the base, by role (TEACHER, PARAPHRASER): where they are, as for the base model.
    side_models: Mapping[str, SideModel] = field(default_factory=dict)


@dataclass
class TrainState:
    """Where the run is; saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    # Micro-batches of ``epoch`` already done (resume mid-epoch).
    micro: int = 0
    best_value: float | None = None
    best_step: int | None = None
    bad_evaluations: int = 0
    evaluated_step: int = -1
    finished: bool = False
    stopped_early: bool = False
    train_seconds: float = 0.0
    # CPU seconds of this worker process while training (all its threads): a throughput measure that other
    # load on the machine disturbs much less than wall time.
    train_cpu_seconds: float = 0.0
    train_samples: int = 0
    # Input tokens trained on (``TrainingBatch.tokens``, over all ranks).
    train_tokens: int = 0


class TrainSession(Protocol):
    """What the loop needs from Ray Train; ``RaySession`` in workers, a local one in tests."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str | None = None) -> None:
        """Report metrics (every rank, equally often) and, from rank 0, a checkpoint directory."""
        ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The latest reported checkpoint as a local directory, or None on a fresh run."""
        ...


class RaySession:
    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str | None = None) -> None:
        import ray.train

        checkpoint = None if checkpoint_dir is None else ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import pyarrow.fs  # type: ignore[import-untyped]
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            yield Path(checkpoint.path)
            return
        # One download per node, not Ray's ``as_directory`` (which can download again over files being read).
        with node_checkpoint(checkpoint) as directory:
            yield directory


class DirectorySession:
    """A single-process session that keeps checkpoints under ``root`` (tests, and runs without Ray). A session
    over a folder an earlier process wrote resumes from its latest checkpoint, as Ray hands a restarted worker."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = sorted(p for p in self.root.glob("checkpoint_*") if p.is_dir())

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, name: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            dest = self.root / (name or f"checkpoint_{len(self.checkpoints):06d}")
            shutil.copytree(checkpoint_dir, dest)
            self.checkpoints.append(dest)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield self.checkpoints[-1] if self.checkpoints else None


def train_loop(config: dict[str, Any]) -> None:
    """Entry point of ``TorchTrainer(train_loop, train_loop_config={"loop": SealedConfig.seal(LoopConfig)})`` (the
    config sealed so that the run's controller, which carries it, imports neither this module nor torch)."""
    import ray.train

    loop = config["loop"].open()
    context = ray.train.get_context()
    runner = LoopRunner(
        loop, context.get_world_rank(), context.get_world_size(), context.get_local_rank(), RaySession()
    )
    runner.run()


# --------------------------------------------------------------------------- helpers


def _process_start_time() -> float:
    """When this process started (seconds since the epoch, to 10 ms), from /proc; 0.0 where there is none."""
    ticks = process_started(os.getpid())
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return 0.0
    return 0.0 if ticks is None else time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def _device(use_gpu: bool, local_rank: int) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means fp32. AUTO is bf16 only where the
    device supports it natively (CUDA with bf16); on CPU it stays fp32, which is faster there."""
    if precision is Precision.NO:
        return None
    if device.type == "cuda":
        if precision is Precision.FP16:
            return torch.float16
        if precision is Precision.BF16 or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision is Precision.BF16:
        return torch.bfloat16
    if precision is Precision.FP16:
        raise ValueError("fp16 mixed precision needs a CUDA device; use bf16 or no on CPU")
    return None


def _all_reduce(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = expected - tensors.keys()
    if missing:
        raise RuntimeError(
            f"checkpoint does not match the model: {len(missing)} parameters missing, e.g. {min(missing)}"
        )
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device))


class LoopRunner:
    def __init__(self, cfg: LoopConfig, rank: int, world_size: int, local_rank: int, session: TrainSession) -> None:
        self.cfg = cfg
        self.session = session
        self.rank = rank
        self.world = world_size
        self.hp = cfg.hyper
        self.device = _device(cfg.use_gpu, local_rank)
        self.task = job_training_task(cfg.task, dpo=cfg.dpo)
        # One worker has nothing to shard with: it trains as without FSDP.
        self.fsdp = cfg.fsdp and world_size > 1
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        # Where the start went (seconds per phase; process start, import and loop entry as wall-clock times).
        self.timings: dict[str, float] = {}

    # -- progress ------------------------------------------------------------------------------------------

    def _push(self, record: dict[str, Any]) -> None:
        if self.rank == 0 and self.cfg.sink is not None:
            if self.cfg.trial is not None:
                record["trial"] = self.cfg.trial
            self.cfg.sink.push(record)

    # -- setup ---------------------------------------------------------------------------------------------

    def _setup(self) -> None:
        from gristmill.training.ml import modeling

        threads = max(1, int(self.cfg.cpus_per_worker))
        if self.device.type == "cpu":
            # Ray sets OMP_NUM_THREADS from the worker's CPUs; torch is told explicitly as well.
            torch.set_num_threads(threads)
        torch.manual_seed(self.hp.seed)
        if self.device.type == "cuda":
            # Models placed when loaded (QLoRA's 4-bit base) go to the current device.
            torch.cuda.set_device(self.device)
        clock = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            self.timings[f"{phase}_s"] = round(now - clock, 3)
            clock = now

        model_dir = self.model_dir = node_model_dir(self.cfg.model_dir, self.cfg.model_files, self.cfg.model_store)
        lap("model_files")
        self.tokenizer = modeling.load_tokenizer(model_dir, chat_template=self.cfg.chat_template)
        lap("tokenizer")
        lora = self.cfg.lora if self.cfg.method.adapters else None
        assert not self.cfg.method.adapters or lora is not None
        model = self.task.build_model(model_dir, self.cfg.label_map, lora)
        if self.cfg.pruning is not None:  # classifiers, method FULL (the spec says so)
            from gristmill.training.ml import slimming

            cut = self.cfg.pruning
            model = slimming.slim_bert_classifier(
                model, slimming.SlimShape(cut.layers, cut.embedding_size, cut.intermediate_size)
            )
        if self.cfg.method is Method.IA3:  # classifiers only (the spec says so)
            model = modeling.apply_ia3(model)
        if self.hp.gradient_checkpointing and not modeling.is_quantized(model):  # QLoRA's base checkpoints already
            modeling.enable_gradient_checkpointing(model)
        self.trainable_parameters, self.total_parameters = modeling.parameter_counts(model)
        # A quantised model is on its device already and cannot be moved.
        self.model = model if modeling.is_quantized(model) else model.to(self.device)
        if self.fsdp:
            # Before the optimizer exists: sharding replaces the parameters (with DTensors) it must hold.
            from gristmill.training.ml import sharding

            sharding.shard(self.model, self.device, self.world)
        lap("model")
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        examples = dict(self.cfg.examples)
        few_labels = self.hp.few_labels
        if few_labels.paraphrase_copies and examples.get("train"):
            from gristmill.training.ml.paraphrase import paraphrase

            examples["train"] = paraphrase(
                examples["train"],
                self._side_model(PARAPHRASER),
                copies=few_labels.paraphrase_copies,
                seed=self.hp.seed,
                device=self.device,
                rank=self.rank,
                world_size=self.world,
            )
            lap("paraphrase")
        if few_labels.augmentation_copies and examples.get("train"):
            examples["train"] = augment(
                examples["train"],
                copies=few_labels.augmentation_copies,
                probability=few_labels.augmentation_probability,
                seed=self.hp.seed,
            )
        self.splits = {
            name: self.task.encode(self.tokenizer, split, self.hp.max_sequence_length)
            for name, split in examples.items()
            if split
        }
        lap("encode")
        self.teacher: Teacher | None = None
        if self.cfg.distillation is not None and examples.get("train"):
            outputs = teacher_outputs(
                self._side_model(TEACHER),
                self.task,
                examples["train"],
                self.cfg.label_map,
                max_length=self.hp.max_sequence_length,
                device=self.device,
                rank=self.rank,
                world_size=self.world,
            )
            distillation = self.cfg.distillation
            self.teacher = Teacher(
                outputs,
                temperature=distillation.temperature,
                weight=distillation.weight,
                hidden_weight=distillation.hidden_weight or 0.0,
            )
            lap("teacher")
        self.adversary: EmbeddingAdversary | None = None
        if few_labels.adversarial_epsilon:
            embeddings = self.model.get_input_embeddings()  # type: ignore[operator]
            self.adversary = EmbeddingAdversary(embeddings, few_labels.adversarial_epsilon)
        # The last evaluation's prediction profile per split (classifiers): the test split's is published.
        self.profiles: dict[str, drift.PredictionProfile] = {}
        train_size = len(self.splits["train"])
        self.steps_per_epoch = D.steps_per_epoch(
            train_size,
            batch_size=self.hp.per_worker_batch_size,
            world_size=self.world,
            accumulation=self.hp.gradient_accumulation_steps,
        )
        self.total_steps = self.steps_per_epoch * self.hp.epochs
        if self.hp.max_steps is not None:
            self.total_steps = min(self.total_steps, self.hp.max_steps)
        self.warmup_steps = int(self.hp.warmup_ratio * self.total_steps)
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hp.learning_rate,
            # The fused kernel saves a launch per parameter on GPU; on CPU the foreach path is the fast one.
            fused=self.device.type == "cuda",
        )
        factor: Callable[[int], float] = lambda step: D.learning_rate_factor(  # noqa: E731
            step, total=self.total_steps, warmup=self.warmup_steps, schedule=self.hp.schedule.value
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.autocast = autocast_dtype(self.hp.mixed_precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast is torch.float16 else None
        lap("optimizer")

    def _side_model(self, role: str) -> Path:
        """The directory of the run's ``role`` model on this node (fetched from the object store when needed)."""
        side = self.cfg.side_models[role]
        return node_model_dir(side.local_dir, side.files, self.cfg.model_store)

    # -- checkpoints ---------------------------------------------------------------------------------------

    def _restore(self) -> None:
        from safetensors.torch import load_file

        with self.session.latest_checkpoint() as path:
            if path is None:
                return
            self.state = TrainState(**json.loads((path / STATE_FILE).read_text()))
            if self.state.finished:
                return
            self._load_trainable(load_file(str(path / TRAINABLE_FILE)))
            if self.fsdp:
                from gristmill.training.ml import sharding

                # Saved on the CPU by name, complete: every rank reads it and keeps its shard.
                sharding.load_optimizer_state(self.model, self.optimizer, torch.load(path / OPTIMIZER_FILE))
            else:
                self.optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, map_location=self.device))
            self.scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE))
            if self.scaler is not None and (path / SCALER_FILE).exists():
                self.scaler.load_state_dict(torch.load(path / SCALER_FILE))
            if (path / BEST_FILE).exists():
                self.best_weights = load_file(str(path / BEST_FILE))
            elif self.state.best_step == self.state.step:
                self.best_weights = self._trainable()
        # Different dropout masks from the first attempt, but a reproducible run from here.
        torch.manual_seed(self.hp.seed + self.state.step)

    def _checkpoint(self, metrics: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        # With FSDP both are gathers every rank joins; without, only rank 0 needs them.
        trainable = self._trainable() if self.fsdp or self.rank == 0 else {}
        optimizer = self._optimizer_state() if self.fsdp or self.rank == 0 else {}
        with tempfile.TemporaryDirectory(prefix="gristmill-ckpt-") as tmp:
            checkpoint = None
            if self.rank == 0:
                path = checkpoint = Path(tmp)
                (path / STATE_FILE).write_text(json.dumps(asdict(self.state)))
                save_file(trainable, str(path / TRAINABLE_FILE))
                if self.best_weights is not None and self.state.best_step != self.state.step:
                    save_file(self.best_weights, str(path / BEST_FILE))
                torch.save(optimizer, path / OPTIMIZER_FILE)
                torch.save(self.scheduler.state_dict(), path / SCHEDULER_FILE)
                if self.scaler is not None:
                    torch.save(self.scaler.state_dict(), path / SCALER_FILE)
            self.session.report(metrics, checkpoint)

    # -- evaluation ----------------------------------------------------------------------------------------

    def _trainable(self) -> dict[str, torch.Tensor]:
        """The trainable parameters' values on the CPU (with FSDP: gathered, a collective; ``{}`` on ranks > 0)."""
        if self.fsdp:
            from gristmill.training.ml import sharding

            return sharding.gather_trainable(self.model, self.rank)
        return _trainable_state(self._unwrapped())

    def _load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.fsdp:
            from gristmill.training.ml import sharding

            sharding.load_trainable(self.model, tensors)
        else:
            _load_trainable(self.model, tensors)

    def _optimizer_state(self) -> dict[str, Any]:
        if self.fsdp:
            from gristmill.training.ml import sharding

            return sharding.optimizer_state(self.model, self.optimizer)
        state: dict[str, Any] = self.optimizer.state_dict()
        return state

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def evaluate(
        self, split_name: str, model: torch.nn.Module | None = None, *, solo: bool = False
    ) -> dict[str, float]:
        """The task's metrics of ``model`` (the one training) on one split, over every rank's share of it
        (``solo``: this rank evaluates the whole split alone, the others do not take part)."""
        split = self.splits[split_name]
        model = model if model is not None else self._unwrapped()
        evaluation = self.task.evaluation(self.cfg.label_map, self.device, self._autocast)
        model.eval()
        rank, world = (0, 1) if solo else (self.rank, self.world)
        size = max(self.hp.per_worker_batch_size, 32)
        chunks = D.batches(D.eval_shard(len(split), rank=rank, world_size=world), size)
        # A sharded forward all-gathers with the other ranks, so under FSDP every rank runs as many as rank 0 (it
        # has the most): the extra ones score into a throwaway evaluation.
        padding = 0
        if self.fsdp and not solo:
            padding = len(D.batches(D.eval_shard(len(split), rank=0, world_size=world), size)) - len(chunks)
        # no_grad under FSDP (inference mode was not tried with sharded parameters); inference_mode elsewhere.
        with torch.no_grad() if self.fsdp else torch.inference_mode():
            for chunk in chunks:
                evaluation.add(model, self.task.collate(split, chunk, self.pad_id).to(self.device))
            scratch = self.task.evaluation(self.cfg.label_map, self.device, self._autocast)
            for _ in range(padding):
                scratch.add(model, self.task.collate(split, [0], self.pad_id).to(self.device))
        if self.fsdp and not solo:
            from gristmill.training.ml import sharding

            sharding.reshard(model)
        model.train()
        totals = (evaluation.totals() if solo else _all_reduce(evaluation.totals(), self.world)).cpu()
        if isinstance(evaluation, ProfilesPredictions):
            self.profiles[split_name] = evaluation.profile(totals, self.cfg.label_map)
        return evaluation.scores(totals)

    def _validate_and_checkpoint(self, epoch_position: float) -> bool:
        """Evaluate on validation (when there is one), update early stopping, report a checkpoint. Returns
        True when training should stop early."""
        self.state.evaluated_step = self.state.step
        metrics: dict[str, Any] = {"step": self.state.step, "epoch": epoch_position}
        stop = False
        if "validation" in self.splits:
            values = self.evaluate("validation")
            metrics.update({f"validation_{k}": v for k, v in values.items()})
            es = self.hp.early_stopping
            value = values[es.metric]
            maximize = es.goal.value == "maximize"
            if D.improved(value, self.state.best_value, maximize=maximize, min_delta=es.min_delta):
                self.state.best_value, self.state.best_step, self.state.bad_evaluations = value, self.state.step, 0
                self.best_weights = self._trainable()
            else:
                self.state.bad_evaluations += 1
                stop = bool(es.patience) and self.state.bad_evaluations >= es.patience
            self._push(
                {
                    "type": "eval",
                    "split": "validation",
                    "step": self.state.step,
                    "epoch": epoch_position,
                    "metrics": values,
                }
            )
        self.state.stopped_early = stop
        self._checkpoint(metrics)
        return stop

    # -- training ------------------------------------------------------------------------------------------

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        shard = D.epoch_shard(
            len(self.splits["train"]), epoch=epoch, seed=self.hp.seed, rank=self.rank, world_size=self.world
        )
        return D.batches(shard, self.hp.per_worker_batch_size)

    def _maybe_fail(self) -> None:
        fault = self.cfg.fault
        if fault is None or fault.rank != self.rank or fault.at_step != self.state.step:
            return
        if fault.mode == "raise":
            raise RuntimeError(f"injected failure at step {self.state.step}")
        if os.path.exists(fault.marker):
            return
        Path(fault.marker).write_text(f"worker {self.rank} exited at step {self.state.step}\n")
        time.sleep(fault.settle_s)
        os._exit(1)

    def _unwrapped(self) -> torch.nn.Module:
        # Evaluation and saving use the plain module: DDP's forward would join collectives that ranks with
        # fewer evaluation batches never reach.
        module = getattr(self.model, "module", self.model) if self.world > 1 else self.model
        assert isinstance(module, torch.nn.Module)
        return module

    def _wrap_ddp(self) -> torch.nn.Module:
        if self.world == 1 or self.fsdp:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    def run(self) -> None:
        started = time.time()
        # The /proc start is on the boot clock, turned into wall time with today's offset: a wall clock that jumped
        # since the process started (a paused VM catching up: 30 s seen in CI) moves it later, yet the process
        # cannot have started after its imports.
        self.timings.update(
            process_started=min(_process_start_time(), _IMPORTED_AT), imported=_IMPORTED_AT, loop_entered=started
        )
        self._setup()
        restoring = time.perf_counter()
        self._restore()
        self.timings["restore_s"] = round(time.perf_counter() - restoring, 3)
        self._push(
            {
                "type": "started",
                "time": time.time(),
                "setup_seconds": time.time() - started,
                "timings": self.timings,
                "step": self.state.step,
                "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch,
                "trainable_parameters": self.trainable_parameters,
                "total_parameters": self.total_parameters,
                "world_size": self.world,
            }
        )
        if self.state.finished:
            return
        self.model = self._wrap_ddp()
        self._train()
        self._finish()

    def _train(self) -> None:
        hp = self.hp
        accumulation = hp.gradient_accumulation_steps
        model = self.model
        model.train()
        stop = self.state.step >= self.total_steps or self.state.stopped_early
        window_loss = torch.zeros((), device=self.device)
        window_steps, window_samples, window_tokens, window_start = 0, 0, 0, time.perf_counter()
        params = [p for p in model.parameters() if p.requires_grad]
        while not stop and self.state.epoch < hp.epochs:
            micro_batches = self._micro_batches(self.state.epoch)
            epoch_start, epoch_cpu = time.perf_counter(), time.process_time()
            while self.state.micro < len(micro_batches) and not stop:
                first = self.state.micro
                group = micro_batches[first : first + accumulation]
                for n, chunk in enumerate(group):
                    batch = self.task.collate(self.splits["train"], chunk, self.pad_id).to(self.device)
                    sync = n == len(group) - 1 or not hasattr(model, "no_sync")
                    with contextlib.nullcontext() if sync else model.no_sync(), self._autocast():  # type: ignore[operator]
                        loss = self._loss(model, batch, chunk) / len(group)
                    self._backward(loss)
                    if self.adversary is not None and self.adversary.perturb():
                        # The same batch pushed along its loss gradient; DDP averages this pass's gradients as well.
                        with contextlib.nullcontext() if sync else model.no_sync(), self._autocast():  # type: ignore[operator]
                            adversarial = self._loss(model, batch, chunk) / len(group)
                        self.adversary.clear()
                        self._backward(adversarial)
                    window_loss += loss.detach()
                    window_samples += batch.size
                    window_tokens += batch.tokens
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.micro += len(group)
                self.state.step += 1
                window_steps += 1
                self._maybe_fail()
                position = self.state.epoch + self.state.micro / len(micro_batches)
                if self.state.step % hp.log_every_steps == 0 or self.state.step == self.total_steps:
                    window_start = self._log(
                        window_loss, window_steps, window_samples, window_tokens, window_start, position
                    )
                    window_loss.zero_()
                    window_steps, window_samples, window_tokens = 0, 0, 0
                if self.state.step >= self.total_steps:
                    stop = True
                elif hp.eval_every_steps and self.state.step % hp.eval_every_steps == 0:
                    self.state.train_seconds += time.perf_counter() - epoch_start
                    self.state.train_cpu_seconds += time.process_time() - epoch_cpu
                    stop = self._validate_and_checkpoint(position)
                    epoch_start = window_start = time.perf_counter()
                    epoch_cpu = time.process_time()
            self.state.train_seconds += time.perf_counter() - epoch_start
            self.state.train_cpu_seconds += time.process_time() - epoch_cpu
            if self.state.micro >= len(micro_batches):
                self.state.epoch += 1
                self.state.micro = 0
                if not stop and not hp.eval_every_steps and self.state.epoch < hp.epochs:
                    stop = self._validate_and_checkpoint(float(self.state.epoch))
                    window_start = time.perf_counter()

    def _loss(self, model: torch.nn.Module, batch: Any, indices: Sequence[int]) -> torch.Tensor:
        """The task's loss, or with distillation the mix of the labels' and the teacher's (``indices``: the batch's
        rows of the train split)."""
        if self.teacher is not None:
            return self.teacher.loss(model, batch, indices)
        return self.task.loss(model, batch)

    def _backward(self, loss: torch.Tensor) -> None:
        # torch declares Tensor.backward without annotations.
        if self.scaler is not None:
            self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        else:
            loss.backward()  # type: ignore[no-untyped-call]

    def _log(
        self, window_loss: torch.Tensor, steps: int, samples: int, tokens: int, window_start: float, position: float
    ) -> float:
        # The one host sync of the log interval: the summed loss (averaged over ranks) and the summed tokens (ranks'
        # batches differ in length), one all-reduce. float64 counts tokens exactly.
        totals = torch.stack([window_loss.double(), torch.tensor(float(tokens), dtype=torch.float64).to(self.device)])
        loss_sum, token_sum = _all_reduce(totals, self.world).tolist()
        loss = loss_sum / max(1, steps) / self.world
        now = time.perf_counter()
        seconds = max(now - window_start, 1e-9)
        throughput = samples * self.world / seconds
        self.state.train_samples += samples * self.world
        self.state.train_tokens += int(token_sum)
        self._push(
            {
                "type": "train",
                "step": self.state.step,
                "epoch": position,
                "total_steps": self.total_steps,
                "metrics": {
                    "loss": loss,
                    "learning_rate": self.scheduler.get_last_lr()[0],
                    "samples_per_second": throughput,
                    "tokens_per_second": token_sum / seconds,
                },
            }
        )
        return now

    def _finish(self) -> None:
        epoch_position = self.state.epoch + (self.state.micro / max(1, self.steps_per_epoch))
        if self.state.evaluated_step != self.state.step:
            self._validate_and_checkpoint(min(epoch_position, float(self.hp.epochs)))
        # Under FSDP the final model is gathered whole on rank 0, which alone evaluates it on the test split, replies
        # with it and saves it (``solo``); the other ranks only report. None on those ranks.
        solo = self.fsdp
        model: torch.nn.Module | None = self._gathered_model() if solo else self._unwrapped()
        if model is not None and self.best_weights is not None and self.state.best_step != self.state.step:
            _load_trainable(model, self.best_weights)
        final: dict[str, Any] = {
            "step": self.state.step,
            "epoch": min(epoch_position, float(self.hp.epochs)),
            "finished": True,
            "stopped_early": self.state.stopped_early,
            "best_step": self.state.best_step if self.state.best_step is not None else self.state.step,
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters,
            "train_samples_per_second": self.state.train_samples / max(self.state.train_seconds, 1e-9),
            "train_tokens_per_second": self.state.train_tokens / max(self.state.train_seconds, 1e-9),
            "train_samples_per_cpu_second": self.state.train_samples / max(self.state.train_cpu_seconds, 1e-9),
        }
        if self.state.best_value is not None:
            final[f"validation_{self.hp.early_stopping.metric}"] = self.state.best_value
        if self.cfg.trial is not None:
            final["trial"] = self.cfg.trial
        test: dict[str, float] = {}
        samples: list[SampleGeneration] = []
        if "test" in self.splits and model is not None:
            test = self.evaluate("test", model, solo=solo)
            generated, samples = self._generate(model, solo=solo)
            test.update(generated)
        self.state.finished = True
        with tempfile.TemporaryDirectory(prefix="gristmill-model-") as tmp:
            out = Path(tmp)
            if self.rank == 0 and model is not None:
                self.task.save(model, self.tokenizer, out)
            if self.cfg.publish_merged and model is not None:
                # After the adapter was saved: merging consumes the model.
                test.update(self._merge(model, out / MERGED_MODEL_DIR, solo=solo))
            final.update({f"test_{k}": v for k, v in test.items()})
            if test:
                self._push(
                    {"type": "eval", "split": "test", "step": self.state.step, "epoch": final["epoch"], "metrics": test}
                )
            checkpoint = None
            if self.rank == 0:
                if samples:
                    (out / LOOP_SAMPLES_FILE).write_text(json.dumps([asdict(sample) for sample in samples]))
                (out / STATE_FILE).write_text(json.dumps(asdict(self.state)))
                (out / LOOP_REPORT_FILE).write_text(json.dumps(final))
                if "test" in self.profiles:
                    # Published with the model: serving scores its predictions' drift against it.
                    (out / drift.PROFILE_FILE).write_text(self.profiles["test"].to_json())
                checkpoint = out
            self.session.report(final, checkpoint, FINAL_CHECKPOINT_NAME)
        self._push({"type": "finished", "metrics": {k: v for k, v in final.items() if isinstance(v, int | float)}})

    def _gathered_model(self) -> torch.nn.Module | None:
        """FSDP: the trained model whole and unsharded on rank 0 (a fresh build with the gathered trainable
        weights; a collective), None on the other ranks."""
        from gristmill.training.ml import sharding

        trained = sharding.gather_trainable(self.model, self.rank)
        if self.rank != 0:
            return None
        lora = self.cfg.lora if self.cfg.method.adapters else None
        model = self.task.build_model(self.model_dir, self.cfg.label_map, lora)
        _load_trainable(model, trained)
        return model.to(self.device)

    def _generate(
        self, model: torch.nn.Module, *, solo: bool = False
    ) -> tuple[dict[str, float], list[SampleGeneration]]:
        """A text-generating task's generation metrics on (the first ``GENERATION_EXAMPLES`` of) the test split, every
        rank replying to its share (``solo``: this rank to all), and this rank's sample generations."""
        if not isinstance(self.task, GeneratesText):
            return {}, []
        if self.cfg.generation_examples is not None:
            from gristmill.training.ml.chat import ChatGenerationEvaluation

            # Another version's chat rows: conversations as they are, whatever this job's own examples are.
            examples = list(self.cfg.generation_examples)[:GENERATION_EXAMPLES]
            evaluation: Any = ChatGenerationEvaluation(
                self.tokenizer, self.device, self._autocast, json_match_keys=self.cfg.json_match_keys
            )
        else:
            examples = self.cfg.examples.get("test", [])[:GENERATION_EXAMPLES]
            evaluation = self.task.generation_evaluation(
                self.tokenizer, self.device, self._autocast, json_match_keys=self.cfg.json_match_keys
            )
        rank, world = (0, 1) if solo else (self.rank, self.world)
        model.eval()
        with torch.inference_mode():
            evaluation.add(model, [examples[i] for i in D.eval_shard(len(examples), rank=rank, world_size=world)])
        model.train()
        totals = evaluation.totals() if solo else _all_reduce(evaluation.totals(), self.world)
        return evaluation.scores(totals.cpu()), evaluation.samples()

    def _merge(self, model: torch.nn.Module, dest: Path, *, solo: bool = False) -> dict[str, float]:
        """``publish_merged``: the adapter folded into the base weights, evaluated on the test split as the adapter
        was (``merged_<metric>``) on every rank, and saved to ``dest`` by rank 0."""
        from gristmill.training.ml import modeling

        merged = modeling.merge_adapter(model, modeling.checkpoint_dtype(self.model_dir))
        scores = {}
        if "test" in self.splits:
            scores = {f"merged_{name}": value for name, value in self.evaluate("test", merged, solo=solo).items()}
        if self.rank == 0:
            modeling.save_merged(merged, self.tokenizer, dest)
        return scores
