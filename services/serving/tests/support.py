"""Test doubles and helpers for the serving service: a fake classifier (no torch), an in-memory model
source whose loads can be held, failed or slowed, and a host on the in-process platform."""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider

from gristmill.core.errors import FailedPreconditionError, NotFoundError
from gristmill.core.host import Infrastructure, ServiceHost
from gristmill.core.licensing import License
from gristmill.core.security import Security, embedded_security
from gristmill.core.settings import KafkaSettings
from gristmill.core.sql import Database
from gristmill.serving.app import ServingApp, build_app
from gristmill.serving.domain.deployments import DeploymentManager
from gristmill.serving.domain.explanations import Explanation, TokenAttribution
from gristmill.serving.domain.model import VersionSelector
from gristmill.serving.domain.predictions import PredictionRecord
from gristmill.serving.domain.service import DeploymentService
from gristmill.serving.domain.sources import Encoded, LoadOptions, ModelSource, ResolvedVersion
from gristmill.serving.runtime.generation import TransformersGenerator
from gristmill.serving.settings import ServingSettings
from gristmill.serving.store.sql import SqlDeploymentStore
from tests.support.databases import migrated_database
from tests.support.licences import signed_license

LABELS = ("negative", "positive")
GOOD, BAD, MEH = 11, 12, 13
_WORDS = {"good": GOOD, "great": GOOD, "bad": BAD, "awful": BAD, "meh": MEH}

# Every licensed feature, no limit: tests of what the licence allows pass their own.
ENTERPRISE = signed_license()


class FakeClassifier:
    """Words "good"/"great" → positive (0.9), "bad"/"awful" → negative (0.9), "meh" → 0.55 positive (uncertain).

    One token per word plus two special tokens, like BERT. ``gate`` (when set) must be opened before a batch
    completes, which lets tests hold a batch "running"; every batch is recorded.
    """

    def __init__(self, version: int, *, max_tokens: int = 64, delay_s: float = 0.0) -> None:
        self.version = version
        self._max_tokens = max_tokens
        self.delay_s = delay_s
        self.batches: list[list[Encoded]] = []
        self.gate: threading.Event | None = None
        self.closed = False
        self.memory_bytes = 1000 * version
        self.fail_with: Exception | None = None
        self.explained: list[tuple[list[str], list[int], int]] = []
        self.shift = 0.0
        self.light_load = False
        self.light_load_threads: list[tuple[str, int]] = []

    @property
    def labels(self) -> Sequence[str]:
        return LABELS

    @property
    def multi_label(self) -> bool:
        return False

    @property
    def max_tokens(self) -> int:
        return self._max_tokens

    def encode(self, texts: Sequence[str], max_tokens: int) -> list[Encoded]:
        out = []
        for text in texts:
            ids = [1] + [_WORDS.get(w.strip(",.!?"), 20 + len(w)) for w in text.lower().split()] + [2]
            full = len(ids)
            if full > max_tokens:
                ids = [*ids[: max_tokens - 1], 2]
            out.append(Encoded(ids, full))
        return out

    def light_load_thread_setup(self, share: int) -> Callable[[], None] | None:
        """With ``light_load`` set (a test asks for it), a setup that records the threads it set up and ``share``."""
        if not self.light_load:
            return None
        return lambda: self.light_load_threads.append((threading.current_thread().name, share))

    def predict(self, batch: Sequence[Encoded]) -> Sequence[Sequence[float]]:
        self.batches.append(list(batch))
        if self.gate is not None and not self.gate.wait(10):
            raise TimeoutError("test gate never opened")
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_with is not None:
            raise self.fail_with
        rows = []
        for item in batch:
            if GOOD in item.ids:
                rows.append([0.1, 0.9])
            elif BAD in item.ids:
                rows.append([0.9, 0.1])
            elif MEH in item.ids:
                rows.append([0.45, 0.55])
            else:
                rows.append([0.3, 0.7])
        # A model of its own (an ensemble's member): ``shift`` moves probability from positive to negative.
        return [[negative + self.shift, positive - self.shift] for negative, positive in rows]

    def explain(
        self, texts: Sequence[str], max_tokens: int, label_indices: Sequence[int], steps: int
    ) -> list[Explanation]:
        """Each word that decides the fake's answer gets +0.4 towards its own label and -0.4 against the other."""
        self.explained.append((list(texts), list(label_indices), steps))
        out = []
        for text, label in zip(texts, label_indices, strict=True):
            tokens = []
            for match in re.finditer(r"\S+", text):
                word = _WORDS.get(match.group().lower().strip(",.!?"))
                score = 0.0 if word not in (GOOD, BAD) else (0.4 if (word == GOOD) == (label == 1) else -0.4)
                tokens.append(TokenAttribution(match.group().lower(), match.start(), match.end(), score))
            out.append(Explanation(label, tuple(tokens), 0.9, 0.5, 0.0))
        return out

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeVersion:
    # Raised by the load (a corrupt artifact, say).
    fail: Exception | None = None
    # When set, the load waits for it (a slow download).
    hold: threading.Event | None = None
    labeling_project_id: str = "sentiment-project"
    label_map: tuple[str, ...] = LABELS


@dataclass
class FakeSource(ModelSource):
    """Registered models in memory: versions, aliases, and what their loads do."""

    versions: dict[tuple[str, int], FakeVersion] = field(default_factory=dict)
    aliases: dict[tuple[str, str], int] = field(default_factory=dict)
    not_ready: set[tuple[str, int]] = field(default_factory=set)
    fetched: list[tuple[str, int]] = field(default_factory=list)

    def add(self, model: str, version: int, **kwargs: object) -> FakeVersion:
        entry = FakeVersion(**kwargs)  # type: ignore[arg-type]
        self.versions[(model, version)] = entry
        return entry

    def resolve(self, organization_id: str, registered_model_name: str, selector: VersionSelector) -> ResolvedVersion:
        version = selector.version
        if selector.alias is not None:
            version = self.aliases.get((registered_model_name, selector.alias))
            if version is None:
                raise NotFoundError(f"no alias {selector.alias!r} on {registered_model_name!r}")
        assert version is not None
        if (registered_model_name, version) not in self.versions:
            raise NotFoundError(f"no version {version} of {registered_model_name!r}")
        if (registered_model_name, version) in self.not_ready:
            raise FailedPreconditionError(f"version {version} of {registered_model_name!r} is not READY")
        entry = self.versions[(registered_model_name, version)]
        return ResolvedVersion(
            registered_model_name,
            version,
            resolved_alias=selector.alias or "",
            label_map=entry.label_map,
            labeling_project_id=entry.labeling_project_id,
        )

    def model_exists(self, organization_id: str, registered_model_name: str) -> bool:
        return any(model == registered_model_name for model, _ in self.versions)

    def fetch(self, resolved: ResolvedVersion) -> Path:
        entry = self.versions[(resolved.registered_model_name, resolved.version)]
        if entry.hold is not None and not entry.hold.wait(10):
            raise TimeoutError("test hold never released")
        if entry.fail is not None:
            raise entry.fail
        self.fetched.append((resolved.registered_model_name, resolved.version))
        return Path("/nonexistent") / resolved.registered_model_name / str(resolved.version)


@dataclass
class FakeLoader:
    """Builds a ``FakeClassifier`` per load and keeps them, so tests can look at batches and ``closed``."""

    loaded: list[FakeClassifier] = field(default_factory=list)
    options: list[LoadOptions] = field(default_factory=list)
    delay_s: float = 0.0
    # Whether the classifiers offer a thread setup for batches that run alone (``light_load_thread_setup``).
    light_load: bool = False

    def __call__(self, directory: Path, resolved: ResolvedVersion, options: LoadOptions) -> FakeClassifier:
        classifier = FakeClassifier(resolved.version, delay_s=self.delay_s)
        classifier.light_load = self.light_load
        self.loaded.append(classifier)
        self.options.append(options)
        return classifier

    def of_version(self, version: int) -> FakeClassifier:
        return [c for c in self.loaded if c.version == version][-1]


class ListSink:
    """A ``PredictionSink`` that keeps what it is given."""

    def __init__(self) -> None:
        self.records: list[PredictionRecord] = []

    def log(self, records: Sequence[PredictionRecord]) -> None:
        self.records.extend(records)


@dataclass
class Env:
    source: FakeSource
    loader: FakeLoader
    store: SqlDeploymentStore
    manager: DeploymentManager
    service: DeploymentService
    sink: ListSink
    database: Database


def make_service(
    tmp_path: Path,
    *,
    seed: int = 7,
    license_: License = ENTERPRISE,
    batch_workers: int = 1,
    light_load_every_core: bool = False,
) -> Env:
    """A ``DeploymentService`` on SQLite in ``tmp_path`` with the fake source and loader (call ``start``),
    under a licence with every feature and no limit unless ``license_`` says otherwise."""
    database = migrated_database(f"sqlite:///{tmp_path / 'serving.db'}", "serving")
    store = SqlDeploymentStore(database)
    source, loader, sink = FakeSource(), FakeLoader(), ListSink()
    manager = DeploymentManager(
        source,
        loader,
        rng=random.Random(seed),
        retry_delay_s=0.01,
        batch_workers=batch_workers,
        light_load_every_core=light_load_every_core,
    )
    service = DeploymentService(store, manager, source, sink=sink, rng=random.Random(seed), license_=license_)
    return Env(source, loader, store, manager, service, sink, database)


async def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0, interval_s: float = 0.01) -> None:
    """Poll ``condition()`` on the event loop until it is true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


@contextmanager
def decoding_paused(generator: TransformersGenerator, step_s: float | None = None) -> Iterator[None]:
    """Inside the block the model's thread waits before each decoding step (holding the model lock, as a long step
    would): for the block's end, or ``step_s`` at most. A prefill still answers with a reply's first token, and the
    reply is certainly still running while the test acts. Holding ``model_lock`` once the first token came is not
    enough: a tiny model can decode hundreds of tokens before the test's next line runs on a loaded machine."""
    batcher = generator._batcher
    resume = threading.Event()
    decode = batcher._decode

    def wait_then_decode() -> None:
        resume.wait(step_s)
        decode()

    batcher._decode = wait_then_decode  # type: ignore[method-assign]
    try:
        yield
    finally:
        del batcher._decode  # the class's method again, before the waiting step goes on
        resume.set()


def greedy_tokens(directory: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' ``generate`` of the causal LM in ``directory``, greedy: the reply every serving path must give."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype="float32").eval()
    return _greedy(model, directory, prompt, max_new_tokens)


def merged_greedy_tokens(adapter: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """``greedy_tokens`` of the LoRA adapter in ``adapter`` merged into its base (``adapter/base``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(adapter / "base", dtype="float32")
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    return _greedy(merged, adapter, prompt, max_new_tokens)


def _greedy(model: object, tokenizer_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tokenizer_dir).eos_token_id
    with torch.inference_mode():
        out = model.generate(  # type: ignore[attr-defined]
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos, eos_token_id=eos
        )
    tokens = [int(t) for t in out[0, len(prompt) :]]
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@dataclass
class RunningHost:
    host: ServiceHost
    port: int
    source: FakeSource
    loader: FakeLoader

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def build_fake_host(
    tmp_path: Path, *, security: Security | None = None, kafka: KafkaSettings | None = None
) -> tuple[ServiceHost, FakeSource, FakeLoader]:
    """The real service wiring on the in-process platform (on ``kafka`` when given), with the fake source and
    loader."""
    app, source, loader = build_fake_app(tmp_path, security=security, kafka=kafka)
    return app.host, source, loader


def build_fake_app(
    tmp_path: Path,
    *,
    security: Security | None = None,
    kafka: KafkaSettings | None = None,
    tracer_provider: TracerProvider | None = None,
) -> tuple[ServingApp, FakeSource, FakeLoader]:
    """``build_fake_host``'s whole app (its deployment service and prediction log as well)."""
    source, loader = FakeSource(), FakeLoader()
    source.add("sentiment", 1)
    source.add("sentiment", 2)
    source.aliases[("sentiment", "production")] = 1
    # One batch at a time whatever the core count, so that tests of queueing see the same queue everywhere.
    settings = ServingSettings(data_dir=tmp_path, grpc_port=0, shutdown_grace_s=1.0, batch_workers=1)
    app = build_app(
        settings,
        Infrastructure(kafka=kafka or KafkaSettings(bootstrap_servers=""), tracer_provider=tracer_provider),
        security or embedded_security("serving", ENTERPRISE),
        source=source,
        loader=loader,
        rng=random.Random(3),
    )
    return app, source, loader
