"""``gristmill demo --task chat``: the assistant flywheel, label → SFT → serve → feedback → DPO → canary → online gate.

As ``gristmill demo`` does for a classifier, the demo does only what people do (create projects and policies,
import, annotate, publish, chat, give feedback) and waits on the platform's events for the rest:

1. a ``chat`` project (feedback on: its models' feedback becomes review items and preference pairs) and its
   ``preference`` project; seed conversations are imported and a simulated annotator keeps or fixes each draft
   reply and rates it; the chat version is published;
2. its ``dataset version published`` event starts the SFT LoRA auto-train job on the registry's base model, the
   registry registers the adapter (with its chat-template hash), the promotion policy's offline gate (floors on
   ``json_valid`` and ``json_match_sentiment``) moves ``candidate``, and the online gate makes the first version
   ``production`` at once; a deployment follows ``production``;
3. simulated users chat through the OpenAI-compatible HTTP API and give feedback by a fixed rule (thumbs down
   when the reply is not the JSON they want, a regenerate keeping the better of two replies, and an edit of
   the better one into the answer wanted when both were bad); labeling turns
   the feedback into preference pairs, which the demo publishes, as a person would, once there are enough;
4. that starts the DPO auto-train job (from the SFT job's merged model, imported as a base model), the registry
   registers the next adapter, the offline gate moves ``candidate``, serving sends it a share of the traffic
   (the deployment's canary), the users keep chatting, and the online gate compares the two versions on their
   feedback and promotes the candidate or rolls it back, with its numbers in the alias history.

Everything the demo calls runs in one trace started by ``gristmill demo``.
"""

from __future__ import annotations

import contextvars
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from opentelemetry import propagate, trace

from gristmill.api.common.v1 import common_pb2
from gristmill.api.labeling.v1 import labeling_pb2 as lb
from gristmill.api.registry.v1 import registry_pb2 as rg
from gristmill.api.serving.v1 import serving_pb2 as sv
from gristmill.api.training.v1 import training_pb2 as tr
from gristmill.cli import chat_demo_data as data
from gristmill.cli.base_model_commands import IMPORT_TIMEOUT_S
from gristmill.cli.conversations import chat_response, conversation_of
from gristmill.cli.demo import StepClock, auto_train_job
from gristmill.cli.job_specs import job_spec
from gristmill.cli.labeling_commands import create_project_request, import_file, import_options, write_export
from gristmill.cli.polling import registered_version, wait_until
from gristmill.cli.promotion_commands import parse_floors, promotion_policy, with_online_gate
from gristmill.cli.serving_commands import DeploymentSettings, deployment_request
from gristmill.cli.training_commands import metric_value
from gristmill.client import Gristmill
from gristmill.core.errors import FailedPreconditionError, NotFoundError
from gristmill.core.tls import TlsSettings

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
CANDIDATE, PRODUCTION = "candidate", "production"
ANNOTATOR = "sim-careful"
# Where a LoRA job with publish_merged puts the merged model, under its artifact prefix (JobSpec.publish_merged).
MERGED_DIR = "merged"
# Offline metrics the summary shows per version (test split).
SHOWN_METRICS = ("json_valid", "json_match_sentiment", "rouge_l", "reward_accuracy")
# Feedback the online gate counts as positive / negative (OnlineTest's documentation).
POSITIVE_KINDS = ("thumbs_up",)
NEGATIVE_KINDS = ("thumbs_down", "regenerate", "edit")
# Feedback that labeling turns into a preference pair (services/labeling/gristmill/labeling/domain/feedback.py).
PAIR_KINDS = ("regenerate", "edit")


@dataclass(frozen=True)
class ChatDemoOptions:
    """What the chat demo builds; zero values pick the ``--tiny`` or the SmolLM2 default."""

    work_dir: Path
    tiny: bool = False
    base_model_name: str = DEFAULT_BASE_MODEL
    data: Path | None = None
    conversations: int = 0
    epochs: int = 0
    learning_rate: float = 0.0
    pairs: int = 0
    min_feedback: int = 0
    min_json_valid: float | None = None
    min_json_match: float | None = None
    canary_weight: float = 0.2
    # Users chatting at once (0: 4 with --tiny, else 32: SmolLM2's replies come from batched decoding, which
    # needs requests in flight to batch).
    users: int = 0
    seed: int = 7
    timeout_s: float = 900.0
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    def pick(self, given: float, tiny: float, full: float) -> float:
        return given or (tiny if self.tiny else full)

    @property
    def seed_count(self) -> int:
        return int(self.pick(self.conversations, 96, 200))

    @property
    def pair_count(self) -> int:
        return int(self.pick(self.pairs, 24, 16))

    @property
    def feedback_needed(self) -> int:
        return int(self.pick(self.min_feedback, 20, 20))

    @property
    def user_count(self) -> int:
        return int(self.pick(self.users, 4, 32))

    @property
    def json_valid_floor(self) -> float:
        return self.min_json_valid if self.min_json_valid is not None else (0.0 if self.tiny else 0.9)

    @property
    def json_match_floor(self) -> float:
        return self.min_json_match if self.min_json_match is not None else (0.0 if self.tiny else 0.8)


@dataclass(frozen=True)
class PreparedChat:
    """The conversations, the users' prompts and (``--tiny``) the base model directory, built before any call."""

    seeds: list[data.SeedConversation]
    prompts: list[data.UserPrompt]
    keys: list[str]
    json_task: bool
    base_model_dir: Path | None
    seconds: float

    def describe(self) -> str:
        base = f"the tiny Llama {self.base_model_dir}" if self.base_model_dir else "no local model (registry's)"
        return f"{len(self.seeds)} seed conversations, {len(self.prompts)} user prompts; {base}"


def prepare_chat(options: ChatDemoOptions) -> PreparedChat:
    """Generate (or read ``--data``) the conversations, and with ``--tiny`` build the tiny Llama (CPU work: runs
    while the platform starts)."""
    began = time.monotonic()
    o = options
    o.work_dir.mkdir(parents=True, exist_ok=True)
    if o.data is not None:
        records = data.load_conversations(o.data, o.conversations)
        if len(records) < 10:
            raise FailedPreconditionError(f"{o.data.name}: {len(records)} conversations; the demo needs at least 10")
        # A fifth is held out: the users send those prompts and judge the replies against the reply recorded.
        held = max(2, len(records) // 5)
        seeds, held_out = records[:-held], records[-held:]
        prompts = [data.UserPrompt(s.prompt, s.reference) for s in held_out]
    else:
        seeds = data.seed_conversations(o.seed_count, o.seed)
        prompts = data.user_prompts(2000, o.seed + 1)
    references = [s.reference for s in seeds]
    base_dir = None
    if o.tiny:
        from gristmill.cli.tiny_model import make_tiny_llama

        # Measured: at this scale (Llama's is 0.02) LoRA on every projection learns the JSON format in ~250 steps.
        base_dir = make_tiny_llama(
            o.work_dir / f"tiny-llama-{o.suffix}",
            data.vocabulary_texts(seeds, prompts[:200]),
            vocab_size=1024,
            initializer_range=0.1,
            seed=o.seed,
        )
    return PreparedChat(
        seeds, prompts, data.match_keys(references), data.is_json_task(references), base_dir, time.monotonic() - began
    )


# --------------------------------------------------------------------------- the simulated users


@dataclass
class Reply:
    request_id: str
    version: int
    text: str
    deployment: str


@dataclass
class FeedbackLedger:
    """What the simulated users sent (thread-safe): feedback by kind and by the version of the reply it names, and
    each reply's verdict as the online gate counts it (one per reply, its latest feedback: a thumbs up positive, a
    thumbs down, a regenerate or an edit negative, as the registry's online gate counts them)."""

    conversations: int = 0
    requests: int = 0
    sent: dict[str, int] = field(default_factory=dict)
    kinds_by_version: dict[int, dict[str, int]] = field(default_factory=dict)
    verdicts: dict[str, tuple[int, bool]] = field(default_factory=dict)
    # request ids of the regenerates and edits (each made a preference pair), oldest first.
    paired: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, version: int, kind: str, request_id: str) -> None:
        with self.lock:
            self.sent[kind] = self.sent.get(kind, 0) + 1
            kinds = self.kinds_by_version.setdefault(version, {})
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind in POSITIVE_KINDS or kind in NEGATIVE_KINDS:
                self.verdicts[request_id] = (version, kind in POSITIVE_KINDS)
            if kind in PAIR_KINDS:
                self.paired.append(request_id)

    def replies_judged(self) -> set[str]:
        with self.lock:
            return set(self.verdicts)

    def by_version(self, exclude: set[str] | frozenset[str] = frozenset()) -> dict[int, dict[str, int]]:
        """Per version: replies judged positive and negative (leaving out the replies in ``exclude``)."""
        with self.lock:
            counts: dict[int, dict[str, int]] = {}
            for request_id, (version, positive) in self.verdicts.items():
                if request_id in exclude:
                    continue
                entry = counts.setdefault(version, {"positive": 0, "negative": 0})
                entry["positive" if positive else "negative"] += 1
            return dict(sorted(counts.items()))

    @property
    def total(self) -> int:
        with self.lock:
            return sum(self.sent.values())


class SimulatedUsers:
    """Users of the assistant through the OpenAI-compatible HTTP API, with OpenAI's own client. Each asks once,
    judges the reply (``chat_demo_data.judge``): thumbs up, or thumbs down and a regenerate; when the second reply
    is good, the better of the two is kept (feedback ``regenerate`` on the first reply), and when both are bad, the
    better one is edited into the answer wanted (feedback ``edit`` on it). Each makes a preference pair."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        tls: TlsSettings | None,
        keys: Sequence[str],
        *,
        max_tokens: int,
        seed: int,
        timeout_s: float = 120.0,
    ) -> None:
        try:
            import openai
        except ImportError:
            raise FailedPreconditionError(
                "the chat demo's users talk to serving with OpenAI's Python client: install it (pip install openai)"
            ) from None
        http_client = None
        if tls is not None and tls.enabled:
            import ssl

            context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
            http_client = openai.DefaultHttpxClient(verify=context)
        # Retries (with OpenAI's backoff, ~30 s in all) ride out a serving restart, as a user's client would; a
        # retried reply is a new generation and a retried feedback is idempotent downstream.
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "embedded", timeout=timeout_s, max_retries=8, http_client=http_client
        )
        self.keys = list(keys)
        self.max_tokens = max_tokens
        self.seed = seed
        self.ledger = FeedbackLedger()
        self._counter = 0
        self._lock = threading.Lock()

    def _next(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def ask(self, deployment: str, prompt: data.UserPrompt, seed: int) -> Reply:
        headers: dict[str, str] = {}
        propagate.inject(headers)  # the demo's trace context (W3C traceparent)
        completion = self.client.chat.completions.create(
            model=deployment,
            messages=list(prompt.prompt),  # type: ignore[arg-type]
            max_tokens=self.max_tokens,
            temperature=0.8,
            top_p=0.95,
            seed=seed,
            extra_headers=headers,
        )
        with self.ledger.lock:
            self.ledger.requests += 1
        # "chatcmpl-<request id>"; system_fingerprint "<model>/<version>" names the version that answered.
        fingerprint = completion.system_fingerprint or ""
        version = int(fingerprint.rpartition("/")[2]) if fingerprint.rpartition("/")[2].isdigit() else 0
        text = completion.choices[0].message.content or ""
        return Reply(completion.id.removeprefix("chatcmpl-"), version, text, deployment)

    def feedback(self, reply: Reply, kind: str, **fields: str) -> None:
        headers: dict[str, str] = {}
        propagate.inject(headers)
        self.client.post(
            "/feedback",
            cast_to=object,
            body={"request_id": reply.request_id, "kind": kind, **fields},
            options={"headers": headers},
        )
        self.ledger.record(reply.version, kind, reply.request_id)

    def converse(self, deployment: str, prompt: data.UserPrompt) -> None:
        """One user: ask, judge, give feedback (and regenerate on a thumbs down)."""
        n = self._next()
        first = self.ask(deployment, prompt, self.seed * 100_000 + 2 * n)
        if data.judge(first.text, prompt.reference, self.keys):
            self.feedback(first, "thumbs_up")
        else:
            self.feedback(first, "thumbs_down")
            second = self.ask(deployment, prompt, self.seed * 100_000 + 2 * n + 1)
            better = data.quality(second.text, prompt.reference, self.keys) > data.quality(
                first.text, prompt.reference, self.keys
            )
            kept, discarded = (second, first) if better else (first, second)
            if not data.judge(kept.text, prompt.reference, self.keys):
                # Two bad replies: the user fixes the better one into the answer wanted (an edit: labeling pairs the
                # fix over that reply). A pair of two wrong replies would teach a wrong answer, and be the wrong
                # reference when training scores its test split.
                self.feedback(kept, "edit", edited_reply=prompt.reference)
            # Two replies to compare: serving refuses a regenerate with an empty one, labeling makes no pair of twins.
            elif kept.text.strip() and discarded.text.strip() and kept.text.strip() != discarded.text.strip():
                self.feedback(first, "regenerate", kept_reply=kept.text, discarded_reply=discarded.text)
        with self.ledger.lock:
            self.ledger.conversations += 1

    def chat_until(
        self,
        route: Callable[[random.Random], str],
        prompts: Iterator[data.UserPrompt],
        done: Callable[[], bool],
        *,
        workers: int,
        max_conversations: int,
        what: str,
    ) -> int:
        """Users chat, ``workers`` conversations at once (each in the demo's trace), until ``done()``; returns how
        many conversations that took. ``route`` picks each one's deployment. A user starts a new conversation as
        soon as one ends (no waiting for the slowest of a round), so serving always has ``workers`` to batch."""
        rng = random.Random(self.seed)
        count = 0
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sim-user") as pool:
            running: set[Future[None]] = set()
            while not done():
                while len(running) < workers and count < max_conversations:
                    ctx = contextvars.copy_context()
                    running.add(pool.submit(ctx.run, self.converse, route(rng), next(prompts)))
                    count += 1
                if not running:
                    raise FailedPreconditionError(f"{what}: not reached after {count} conversations")
                ended, running = wait(running, return_when=FIRST_COMPLETED)
                for job in ended:
                    job.result()
            for job in running:  # the conversations under way end as their users would; their feedback counts
                job.result()
        return count


def openai_base_url(serving: str, openai_address: str = "") -> str:
    """The OpenAI-compatible API's ``base_url``: the address the embedded platform's READY line names (its port is a
    free one), else the serving port + 2 (the services' default: ``gristmill up`` prints it)."""
    from gristmill.core.ports import OPENAI_HTTP_PORT_OFFSET

    if openai_address:
        return f"http://{openai_address}/v1"
    host, _, port = serving.rpartition(":")
    return f"http://{host}:{int(port) + OPENAI_HTTP_PORT_OFFSET}/v1"


# --------------------------------------------------------------------------- the demo


class ChatDemo:
    """One run of the assistant flywheel against running services (``gm``)."""

    def __init__(
        self,
        gm: Gristmill,
        options: ChatDemoOptions,
        tracer: trace.Tracer,
        out: TextIO,
        prepared: PreparedChat,
        *,
        openai_url: str,
        api_key: str = "",
        tls: TlsSettings | None = None,
    ) -> None:
        self.gm = gm
        self.options = options
        self.prepared = prepared
        self.tracer = tracer
        self.out = out
        self.clock = StepClock(out)
        self.openai_url = openai_url
        self.api_key = api_key
        self.tls = tls
        name = f"demo-assistant-{options.suffix}"
        self.project_id = name
        self.preference_id = f"{name}-pref"
        self.model = name
        self.deployment = name
        self.canary_deployment = ""
        self.keys = prepared.keys
        self.summary: dict[str, Any] = {
            "task": "chat",
            "project": name,
            "preference_project": self.preference_id,
            "model": name,
            "deployment": name,
        }
        self.began = time.monotonic()

    def _step(self, name: str) -> Any:
        return self.clock.step(name, self.tracer)

    def _left(self) -> float:
        return max(5.0, self.options.timeout_s - (time.monotonic() - self.began))

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.began = time.monotonic()
        o = self.options

        with self._step("create the chat project (feedback on) and its preference project") as note:
            self._create_projects()
            note["detail"] = f"{self.project_id} (chat), {self.preference_id} (preference); one answer per item"

        with self._step("base model in the registry") as note:
            base = self._base_model()
            self.summary["base_model"] = {
                "name": base.name,
                "parameters": int(base.parameter_count),
                "chat_template_sha256": base.chat_template_sha256,
            }
            note["detail"] = (
                f"{base.name}: {base.model_type}, {base.parameter_count / 1e6:.2f}M parameters, chat template "
                f"{base.chat_template_sha256[:12]}"
            )

        with self._step("policies: SFT auto-train, promotion with an online gate") as note:
            self._set_policies(base.name)
            note["detail"] = (
                f"SFT LoRA on {base.name} when {self.project_id} publishes; {self._gate_text()}; "
                f"online gate: {o.feedback_needed} feedback per version, two-proportion z test"
            )

        with self._step("import the seed conversations") as note:
            report = self._import()
            self.summary["import"] = {
                "received": report.received_count,
                "accepted": report.accepted_count,
                "dropped_exact_duplicates": report.dropped_exact_duplicate_count,
                "pii_masked_items": report.pii_masked_item_count,
            }
            note["detail"] = (
                f"{report.received_count} received, {report.accepted_count} accepted "
                f"({report.dropped_exact_duplicate_count} exact duplicates dropped, PII masked in "
                f"{report.pii_masked_item_count})"
            )

        with self._step("a careful annotator keeps or fixes each reply and rates it") as note:
            counts = self._annotate()
            self.summary["annotation"] = counts
            note["detail"] = (
                f"{ANNOTATOR}: {counts['kept']} kept, {counts['edited']} fixed, {counts['written']} written "
                f"({', '.join(f'{k} {v}' for k, v in sorted(counts['flaws'].items())) or 'no flawed drafts'})"
            )

        with self._step("publish the chat dataset version") as note:
            chat_version = self._publish(self.project_id, "seed conversations")
            self.summary["chat_dataset"] = chat_version
            note["detail"] = self._version_text(chat_version)

        with self._step("SFT auto-train (dataset-version-published event)") as note:
            sft = self._job(self.project_id, chat_version["id"])
            self.summary["sft_job"] = sft
            note["detail"] = f"job {sft['id']} succeeded: {self._metrics_text(sft['metrics'])}"

        with self._step("registry registers the adapter (job-state-changed event)") as note:
            v1 = self._registered(sft["id"])
            note["detail"] = f"{self.model} v{v1['version']} READY, chat template {v1['chat_template_sha256'][:12]}"

        with self._step("offline gate moves candidate; the online gate makes it production (no baseline)") as note:
            self._wait_aliases({CANDIDATE: v1["version"], PRODUCTION: v1["version"]}, "v1 to become candidate and "
                               "production")  # fmt: skip
            note["detail"] = f"candidate = production = v{v1['version']}: {self._latest_reason(PRODUCTION)}"

        with self._step("serving: a deployment on production with a canary on candidate") as note:
            note["detail"] = f"{self._deploy(v1['version'])}; OpenAI API {self.openai_url}"

        with self._step("DPO base: the SFT job's merged model; DPO auto-train on the preference project") as note:
            dpo_base = self._dpo_base(sft["id"], sft["artifact_prefix"], sft["files"], chat_version)
            note["detail"] = (
                f"base model {dpo_base}; DPO LoRA when {self.preference_id} publishes, its replies scored on "
                f"{chat_version['project']} v{chat_version['number']}'s test conversations"
            )

        users = SimulatedUsers(
            self.openai_url, self.api_key, self.tls, self.keys, max_tokens=self._max_tokens(), seed=o.seed
        )
        prompts = iter(_cycle(self.prepared.prompts))
        with self._step("users chat and give feedback; labeling turns it into preference pairs") as note:
            pairs = self._first_round(users, prompts)
            sent = users.ledger.by_version()
            note["detail"] = (
                f"{users.ledger.conversations} conversations, {users.ledger.requests} replies, feedback "
                f"{self._counts_text(users.ledger.sent)}; {pairs} preference pairs in {self.preference_id}"
            )
            self.summary["first_round"] = {
                "conversations": users.ledger.conversations,
                "pairs": pairs,
                "by_version": {str(v): c for v, c in sent.items()},
            }

        with self._step("publish the preference dataset version (as a person would)") as note:
            # A fifth for the test split: the offline gate reads the DPO job's test metrics.
            ratios = lb.SplitRatios(train=0.7, validation=0.1, test=0.2)
            pref_version = self._publish(self.preference_id, "preference pairs from feedback", ratios)
            self.summary["preference_dataset"] = pref_version
            note["detail"] = self._version_text(pref_version)

        with self._step("DPO auto-train (dataset-version-published event)") as note:
            dpo = self._job(self.preference_id, pref_version["id"])
            self.summary["dpo_job"] = dpo
            note["detail"] = f"job {dpo['id']} succeeded: {self._metrics_text(dpo['metrics'])}"

        with self._step("registry registers the next adapter; the offline gate moves candidate") as note:
            v2 = self._registered(dpo["id"])
            candidate_sequence = self._wait_aliases({CANDIDATE: v2["version"]}, f"v{v2['version']} to pass the "
                                                    "offline gate and become candidate")  # fmt: skip
            note["detail"] = f"candidate -> v{v2['version']}: {self._latest_reason(CANDIDATE)}"

        with self._step("serving loads the candidate as the canary (alias-changed event)") as note:
            note["detail"] = self._canary_follows(v1["version"], v2["version"])

        before = users.ledger.replies_judged()
        with self._step("users keep chatting; the online gate decides (feedback-recorded events)") as note:
            decision = self._second_round(users, prompts, candidate_sequence)
            note["detail"] = decision["reason"]
            self.summary["gate"] = decision

        self.summary["feedback"] = self._feedback_summary(users.ledger, before)
        with self._step("lineage: one user's feedback to the adapter that learned from it") as note:
            lineage = self._lineage(users.ledger, pref_version, dpo["id"])
            self.summary["lineage"] = lineage
            note["detail"] = (
                f"request {lineage['request_id']} -> item {lineage['preference_item_id']} -> "
                f"{self.preference_id} v{pref_version['number']} (in its rows: {lineage['in_published_rows']}) -> "
                f"job {lineage['dpo_job_id']} -> v{lineage['version']}"
            )

        self.summary["versions"] = self._versions()
        self.summary["history"] = self._history()
        self.summary["aliases"] = self._aliases()
        self.summary["steps"] = [{"name": n, "seconds": round(s, 2), "detail": d} for n, s, d in self.clock.steps]
        self.summary["total_seconds"] = round(time.monotonic() - self.began, 2)
        return self.summary

    # -- steps ---------------------------------------------------------------------------------------------

    def _create_projects(self) -> None:
        # Near-duplicate detection off: every conversation shares the system prompt and a templated reply.
        cleaning = lb.CleaningSettings(near_duplicate_policy=lb.NEAR_DUPLICATE_POLICY_OFF)
        self.gm.labeling.CreateProject(
            create_project_request(
                "Demo assistant preferences",
                [],
                project_id=self.preference_id,
                description="gristmill chat demo: preference pairs from users' regenerates and edits",
                task="preference",
                cleaning=cleaning,
            )
        )
        self.gm.labeling.CreateProject(
            create_project_request(
                "Demo assistant",
                [],
                project_id=self.project_id,
                description="gristmill chat demo: customer-service replies as JSON",
                task="chat",
                cleaning=cleaning,
                feedback=lb.FeedbackSettings(import_feedback=True, preference_project_id=self.preference_id),
            )
        )

    def _base_model(self) -> rg.BaseModel:
        o = self.options
        if self.prepared.base_model_dir is not None:
            return self.gm.registry.ImportBaseModel(
                rg.ImportBaseModelRequest(
                    name=f"demo-tiny-llama-{o.suffix}",
                    local_path=str(self.prepared.base_model_dir.resolve()),
                    license="apache-2.0",
                    description="gristmill chat demo: a 2-layer Llama built in code",
                ),
                timeout=IMPORT_TIMEOUT_S,
            )
        try:
            return self.gm.registry.GetBaseModel(rg.GetBaseModelRequest(name=o.base_model_name))
        except NotFoundError:
            if o.base_model_name != DEFAULT_BASE_MODEL:
                raise NotFoundError(
                    f"base model {o.base_model_name!r} is not in the registry: import it first "
                    f"(gristmill base-models import {o.base_model_name} --gguf FILE or --local-path DIR)"
                ) from None
        from gristmill.cli.tiny_model import smollm2_gguf_path

        try:
            gguf = smollm2_gguf_path()
        except ImportError as exc:
            raise FailedPreconditionError(f"{exc} (or run the demo with --tiny)") from None
        self.out.write(f"    importing {gguf.name} as {DEFAULT_BASE_MODEL!r} (de-quantised once)\n")
        return self.gm.registry.ImportBaseModel(
            rg.ImportBaseModelRequest(
                name=DEFAULT_BASE_MODEL, gguf_file=str(gguf), license="apache-2.0", description="SmolLM2-135M-Instruct"
            ),
            timeout=IMPORT_TIMEOUT_S,
        )

    def _gate_metric(self) -> str:
        """``json_valid`` when the replies are JSON objects (the demo's data); free text has ROUGE-L only."""
        return "json_valid" if self.prepared.json_task else "rouge_l"

    def _gate_floor(self) -> float:
        return self.options.json_valid_floor if self.prepared.json_task else 0.0

    def _gate_text(self) -> str:
        o = self.options
        floors = [f"{self._gate_metric()}/test >= {self._gate_floor():g}"]
        floors += [f"json_match_{k}/test >= {o.json_match_floor:g}" for k in self.keys]
        return f"{CANDIDATE} moves when {' and '.join(floors)}"

    def _template(self, *, project: str, base_model_name: str, objective: str) -> tr.JobSpec:
        o = self.options
        dpo = objective == "dpo"
        # Measured: the tiny Llama's adapter writes valid JSON after ~200 steps of SFT (20 epochs of ~77 rows).
        if o.tiny:
            epochs, rate = (5, 1e-2) if dpo else (20, 2e-2)
        else:
            epochs, rate = (1, 5e-5) if dpo else (1, 5e-4)
        spec = job_spec(
            project_id=project,
            dataset_version_id="",
            base_model_name=base_model_name,
            model=self.model,
            display_name=f"demo {objective} ({project})",
            epochs=o.epochs or epochs,
            learning_rate=o.learning_rate or rate,
            batch_size=8,
            max_length=224 if dpo else 192,
            log_every_steps=25 if o.tiny and not dpo else 5,
            lora=True,
            objective=objective,
            merged=not dpo,  # the merged SFT model is the DPO job's base (and its reference model)
        )
        spec.ClearField("dataset_version")
        spec.json_match_keys.extend(self.keys)
        spec.lora.rank = 8 if o.tiny else 16
        spec.lora.target_modules.extend(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        if o.tiny:
            # Measured: without the output layer the tiny model's greedy reply is right but its distribution so flat
            # that a sampled reply (what users get) is noise; with it, sampled replies are valid JSON too.
            spec.lora.target_modules.append("lm_head")
        if o.tiny and not dpo:
            spec.hyper_parameters.eval_every_steps = 50
        spec.hyper_parameters.seed = o.seed
        spec.tags["demo"] = "chat"
        spec.tags["stage"] = objective
        return spec

    def _set_policies(self, base_model_name: str) -> None:
        o = self.options
        self.gm.training.SetAutoTrainPolicy(
            tr.SetAutoTrainPolicyRequest(
                policy=tr.AutoTrainPolicy(
                    project_id=self.project_id,
                    enabled=True,
                    job_template=self._template(
                        project=self.project_id, base_model_name=base_model_name, objective="sft"
                    ),
                )
            )
        )
        # The promotion policy needs the registered model: create it now (the first version registers into it).
        self.gm.registry.CreateRegisteredModel(
            rg.CreateRegisteredModelRequest(
                name=self.model,
                description="gristmill chat demo: a customer-service assistant answering in JSON",
                task=common_pb2.TASK_TYPE_CHAT,
            )
        )
        # The offline gate checks floors only and moves the canary's alias; the online gate compares the canary with
        # production on production feedback.
        policy = promotion_policy(
            self.model,
            alias=CANDIDATE,
            metric=self._gate_metric(),
            split="test",
            min_value=self._gate_floor(),
            min_improvement=0.0,
        )
        policy.min_metrics.extend(parse_floors([f"json_match_{k}={o.json_match_floor}" for k in self.keys], "test"))
        with_online_gate(
            policy, baseline_alias=PRODUCTION, min_feedback=o.feedback_needed, test="z", alpha=0.05, max_rate_drop=0.05
        )
        self.gm.registry.SetPromotionPolicy(rg.SetPromotionPolicyRequest(policy=policy))

    def _import(self) -> lb.ImportReport:
        path = self.options.work_dir / f"chat-demo-import-{self.options.suffix}.jsonl"
        path.write_text("".join(json.dumps(s.record()) + "\n" for s in self.prepared.seeds))
        options = import_options(self.project_id, path, request_id=f"chat-demo-{self.options.suffix}")
        return import_file(self.gm, options, path)

    def _annotate(self) -> dict[str, Any]:
        """The careful annotator: a reply that is already the one wanted is kept, any other is rewritten to it
        (written when there is none); each is rated 5 as it ends up (the item's SFT row is that reply)."""
        wanted = {s.external_id: s for s in self.prepared.seeds}
        counts: dict[str, Any] = {"kept": 0, "edited": 0, "written": 0, "flaws": {}}
        while True:
            reply = self.gm.labeling.NextTask(lb.NextTaskRequest(project_id=self.project_id, annotator_id=ANNOTATOR))
            if not reply.HasField("task"):
                return counts
            item = reply.task.item
            conversation = conversation_of(item.conversation)
            seed = wanted.get(item.external_id)
            own = conversation.final_reply
            reference = seed.reference if seed is not None else own or ""
            if own is not None and own.strip() == reference.strip():
                response, kind = chat_response(own, None, 5, []), "kept"
            else:
                response, kind = chat_response(own, reference, 5, []), "written" if own is None else "edited"
            if seed is not None and seed.flaw:
                counts["flaws"][seed.flaw] = counts["flaws"].get(seed.flaw, 0) + 1
            self.gm.labeling.SubmitAnnotation(
                lb.SubmitAnnotationRequest(
                    project_id=self.project_id,
                    item_id=item.item_id,
                    annotator_id=ANNOTATOR,
                    task_id=reply.task.task_id,
                    response=response,
                )
            )
            counts[kind] += 1

    def _publish(self, project_id: str, description: str, ratios: lb.SplitRatios | None = None) -> dict[str, Any]:
        published = self.gm.labeling.PublishDatasetVersion(
            lb.PublishDatasetVersionRequest(
                project_id=project_id, seed=self.options.seed, description=description, ratios=ratios
            )
        ).dataset_version
        splits = {
            common_pb2.DatasetSplit.Name(s.split).removeprefix("DATASET_SPLIT_").lower(): int(s.item_count)
            for s in published.splits
        }
        return {
            "project": project_id,
            "id": published.dataset_version_id,
            "number": published.version_number,
            "row_format": published.row_format,
            "train": splits.get("train", 0),
            "validation": splits.get("validation", 0),
            "test": splits.get("test", 0),
        }

    @staticmethod
    def _version_text(v: dict[str, Any]) -> str:
        return (
            f"{v['project']} v{v['number']} ({v['id']}, {v['row_format']}): train {v['train']} / validation "
            f"{v['validation']} / test {v['test']}"
        )

    def _job(self, project_id: str, dataset_version_id: str) -> dict[str, Any]:
        job = auto_train_job(self.gm, project_id, dataset_version_id, self.out, self._left)
        metrics = {
            name: value
            for name in SHOWN_METRICS
            if (value := metric_value(job.result.metrics, name, common_pb2.DATASET_SPLIT_TEST)) is not None
        }
        running = (
            job.end_time.ToNanoseconds() / 1e9 - job.start_time.ToNanoseconds() / 1e9 if job.start_time.seconds else 0
        )
        return {
            "id": job.job_id,
            "objective": tr.Objective.Name(job.spec.objective).removeprefix("OBJECTIVE_").lower(),
            "base_model": job.spec.base_model.base_model_name,
            "running_seconds": round(running, 1),
            "metrics": metrics,
            "artifact_prefix": job.result.artifact_prefix,
            "files": [f.key for f in job.result.files],
        }

    @staticmethod
    def _metrics_text(metrics: dict[str, float]) -> str:
        return ", ".join(f"{k}/test {v:.3f}" for k, v in metrics.items()) or "no test metrics"

    def _registered(self, job_id: str) -> dict[str, Any]:
        version = registered_version(self.gm, self.model, job_id, self._left())
        self._check_floors(version)
        return {
            "version": version.version,
            "job_id": job_id,
            "chat_template_sha256": version.lineage.hyper_parameters.get("chat_template.sha256", ""),
        }

    def _check_floors(self, version: rg.ModelVersion) -> None:
        """A version below the policy's floors never becomes candidate: say so now rather than wait for it."""
        o = self.options
        floors = {self._gate_metric(): self._gate_floor()} | {f"json_match_{k}": o.json_match_floor for k in self.keys}
        missed = []
        for name, floor in floors.items():
            value = metric_value(version.metrics, name, common_pb2.DATASET_SPLIT_TEST)
            if value is None or value < floor:
                missed.append(f"{name}/test {'missing' if value is None else f'{value:.3f}'} < {floor:g}")
        if missed:
            raise FailedPreconditionError(
                f"v{version.version} does not pass the offline gate ({', '.join(missed)}), so it will not become "
                "candidate: train more (--epochs, --items) or lower the floors (--min-json-valid, --min-json-match)"
            )

    def _wait_aliases(self, wanted: dict[str, int], what: str) -> int:
        """Wait until each alias points to its version; returns the history sequence of the latest of those moves."""

        def moved() -> int | None:
            model = self.gm.registry.GetRegisteredModel(rg.GetRegisteredModelRequest(name=self.model))
            if any(model.aliases.get(alias) != version for alias, version in wanted.items()):
                return None
            changes = self._changes()
            return max((c.sequence for c in changes if c.alias in wanted), default=0)

        return wait_until(what, moved, self._left())

    def _changes(self) -> list[rg.AliasChange]:
        """Every alias change of the model, newest first."""
        changes: list[rg.AliasChange] = []
        token = ""
        while True:
            page = self.gm.registry.GetAliasHistory(
                rg.GetAliasHistoryRequest(
                    registered_model_name=self.model, page=common_pb2.PageRequest(page_size=200, page_token=token)
                )
            )
            changes.extend(page.changes)
            token = page.next_page_token
            if not token:
                return sorted(changes, key=lambda c: -c.sequence)

    def _latest_reason(self, alias: str) -> str:
        latest = next((c for c in self._changes() if c.alias == alias), None)
        if latest is None:
            return ""
        cause = rg.AliasChangeCause.Name(latest.cause).removeprefix("ALIAS_CHANGE_CAUSE_").lower()
        return f"{cause}: {latest.decision.explanation or latest.reason}"

    def _deploy(self, version: int) -> str:
        """A deployment whose target is ``production`` and whose canary is ``candidate`` (both on ``version`` now:
        a canary may rest on the primary's version), so that serving follows every later move of either alias. An
        install without the ``serving.canary`` licence feature gets a second deployment following ``candidate``
        instead, and the users' client sends it the canary's share of the conversations."""
        o = self.options
        canary = DeploymentSettings(canary_alias=CANDIDATE, canary_weight=o.canary_weight)
        deployment = deployment_request(self.deployment, self.model, alias=PRODUCTION, version=0, uncertainty=None,
                                        sample_rate=0.0, settings=canary)  # fmt: skip
        try:
            self.gm.serving.CreateDeployment(sv.CreateDeploymentRequest(deployment=deployment))
        except FailedPreconditionError as exc:
            if "licen" not in str(exc):
                raise
            deployment.ClearField("canary")
            self.gm.serving.CreateDeployment(sv.CreateDeploymentRequest(deployment=deployment))
            self.canary_deployment = f"{self.deployment}-candidate"
            second = deployment_request(self.canary_deployment, self.model, alias=CANDIDATE, version=0,
                                        uncertainty=None, sample_rate=0.0)  # fmt: skip
            self.gm.serving.CreateDeployment(sv.CreateDeploymentRequest(deployment=second))
            self._wait_serving(self.canary_deployment, {version})
            self.summary["routing"] = f"client split: {o.canary_weight:.0%} to deployment {self.canary_deployment}"
            self._wait_serving(self.deployment, {version})
            return (
                f"deployment {self.deployment} follows production; {exc}: deployment {self.canary_deployment} follows "
                f"candidate instead and the users' client sends it {o.canary_weight:.0%} of the conversations"
            )
        self.summary["routing"] = f"canary: {o.canary_weight:.0%} of {self.deployment} to alias {CANDIDATE}"
        self._wait_serving(self.deployment, {version})
        return f"deployment {self.deployment}: production, canary candidate at {o.canary_weight:.0%} (both v{version})"

    def _canary_follows(self, production: int, candidate: int) -> str:
        """Wait until serving loaded the candidate beside production (the ``alias changed`` event)."""
        if self.canary_deployment:
            self._wait_serving(self.canary_deployment, {candidate})
            return f"{self.canary_deployment} serves v{candidate}; {self.deployment} v{production}"
        self._wait_serving(self.deployment, {production, candidate})
        deployment = self.gm.serving.GetDeployment(sv.GetDeploymentRequest(name=self.deployment))
        weights = ", ".join(
            f"v{v.version} {v.traffic_weight:.0%}" for v in deployment.status.versions if v.traffic_weight
        )
        return f"{self.deployment}: {weights}"

    def _alias_version(self, alias: str) -> int:
        return self.gm.registry.GetRegisteredModel(rg.GetRegisteredModelRequest(name=self.model)).aliases[alias]

    def _wait_serving(self, name: str, versions: set[int]) -> None:
        def loaded() -> bool:
            deployment = self.gm.serving.GetDeployment(sv.GetDeploymentRequest(name=name))
            if deployment.status.state != sv.DEPLOYMENT_STATE_READY:
                return False
            serving = {v.version for v in deployment.status.versions if v.traffic_weight > 0}
            return versions <= serving

        wanted = ", ".join(f"v{v}" for v in sorted(versions))
        wait_until(f"deployment {name} to serve {wanted}", loaded, self._left())

    def _dpo_base(self, sft_job_id: str, artifact_prefix: str, files: list[str], chat_version: dict[str, Any]) -> str:
        """Import the SFT job's merged model as a base model (the DPO job starts from it and keeps it as its
        reference), then set the preference project's DPO auto-train policy on it, scored on the chat version's test
        conversations as the SFT version was: the preference version's own test pairs are prompts the users disliked
        a reply to, where the offline gate's floors would be a coin toss."""
        merged = f"{artifact_prefix.rstrip('/')}/{MERGED_DIR}"
        if f"{merged}/config.json" not in files:
            raise FailedPreconditionError(f"SFT job {sft_job_id} published no merged model under {merged}/")
        name = f"{self.model}-sft"
        imported = self.gm.registry.ImportBaseModel(
            rg.ImportBaseModelRequest(
                name=name,
                object_prefix=merged,
                license="apache-2.0",
                description=f"gristmill chat demo: SFT job {sft_job_id}, merged",
            ),
            timeout=IMPORT_TIMEOUT_S,
        )
        template = self._template(project=self.preference_id, base_model_name=imported.name, objective="dpo")
        template.evaluation_dataset_version.project_id = chat_version["project"]
        template.evaluation_dataset_version.dataset_version_id = chat_version["id"]
        self.gm.training.SetAutoTrainPolicy(
            tr.SetAutoTrainPolicyRequest(
                policy=tr.AutoTrainPolicy(project_id=self.preference_id, enabled=True, job_template=template)
            )
        )
        return imported.name

    def _max_tokens(self) -> int:
        # The JSON answers are under 40 tokens of either tokenizer (24 of the tiny one).
        return 48 if self.options.tiny else 64

    def _preference_pairs(self) -> int:
        """Labeled preference items made from feedback."""
        count, token = 0, ""
        while True:
            page = self.gm.labeling.ListItems(
                lb.ListItemsRequest(
                    project_id=self.preference_id,
                    source=lb.ITEM_SOURCE_FEEDBACK,
                    statuses=[lb.ITEM_STATUS_LABELED],
                    page=common_pb2.PageRequest(page_size=500, page_token=token),
                )
            )
            count += len(page.items)
            token = page.next_page_token
            if not token:
                return count

    def _first_round(self, users: SimulatedUsers, prompts: Iterator[data.UserPrompt]) -> int:
        """Users chat with the production version until the preference project holds enough pairs; then the
        pairs they sent are waited for (the events may still be on their way)."""
        o = self.options
        needed = o.pair_count
        users.chat_until(
            lambda rng: self.deployment,
            prompts,
            lambda: len(users.ledger.paired) >= needed,
            workers=o.user_count,
            max_conversations=needed * 40,
            what=f"{needed} regenerates or edits (the users liked almost every reply: lower --pairs)",
        )
        sent = len(users.ledger.paired)
        # Exact duplicates are dropped by labeling's import: expect most, not all, of what was sent.
        return wait_until(
            f"labeling to turn {sent} regenerates and edits into {needed} preference pairs",
            lambda: pairs if (pairs := self._preference_pairs()) >= needed else None,
            self._left(),
        )

    def _second_round(self, users: SimulatedUsers, prompts: Iterator[data.UserPrompt], after: int) -> dict[str, Any]:
        """Users chat until the online gate decides: an ONLINE_GATE change after the candidate's move."""
        o = self.options
        found: list[rg.AliasChange] = []

        def decided() -> bool:
            if not found:
                found.extend(
                    c for c in self._changes() if c.sequence > after and c.cause == rg.ALIAS_CHANGE_CAUSE_ONLINE_GATE
                )
            return bool(found)

        if self.canary_deployment:
            canary = self.canary_deployment

            def route(rng: random.Random) -> str:
                return canary if rng.random() < o.canary_weight else self.deployment
        else:

            def route(rng: random.Random) -> str:
                return self.deployment

        # Enough conversations that the candidate gets its feedback at the canary's share, many times over.
        limit = int(40 * o.feedback_needed / max(o.canary_weight, 0.01))
        users.chat_until(
            route,
            prompts,
            decided,
            workers=o.user_count,
            max_conversations=limit,
            what="the online gate's decision",
        )
        change = min(found, key=lambda c: c.sequence)
        online = change.decision.online
        promoted = change.decision.passed
        return {
            "decision": "promoted" if promoted else "rolled back",
            "alias": change.alias,
            "from_version": change.from_version if change.HasField("from_version") else None,
            "to_version": change.to_version if change.HasField("to_version") else None,
            "candidate_version": change.decision.candidate_version,
            "baseline_version": change.decision.baseline_version
            if change.decision.HasField("baseline_version")
            else None,
            "reason": change.decision.explanation or change.reason,
            "online": {
                "test": rg.OnlineTest.Name(online.test).removeprefix("ONLINE_TEST_").lower(),
                "candidate_positive": online.candidate_positive,
                "candidate_negative": online.candidate_negative,
                "baseline_positive": online.baseline_positive,
                "baseline_negative": online.baseline_negative,
                "z": round(online.z, 4),
                "p_value": round(online.p_value, 6),
                "alpha": online.alpha,
                "max_rate_drop": online.max_rate_drop,
            },
            "sequence": change.sequence,
        }

    @staticmethod
    def _counts_text(counts: dict[str, int]) -> str:
        return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())) or "none"

    def _feedback_summary(self, ledger: FeedbackLedger, before: set[str]) -> dict[str, Any]:
        """What the users sent; ``since_candidate``: the replies judged after the candidate moved (what the online
        gate counts, up to its decision)."""
        return {
            "conversations": ledger.conversations,
            "requests": ledger.requests,
            "sent": ledger.total,
            "by_kind": dict(sorted(ledger.sent.items())),
            "kinds_by_version": {str(v): dict(sorted(k.items())) for v, k in sorted(ledger.kinds_by_version.items())},
            "by_version": {str(v): c for v, c in ledger.by_version().items()},
            "since_candidate": {str(v): c for v, c in ledger.by_version(exclude=before).items()},
        }

    def _lineage(self, ledger: FeedbackLedger, pref_version: dict[str, Any], dpo_job_id: str) -> dict[str, Any]:
        """From one user's regenerate or edit (its request id) to the preference item it made, the published version's
        rows that hold it, the DPO job started by that version and the registered adapter it produced."""
        items: dict[str, lb.Item] = {}
        token = ""
        while True:
            page = self.gm.labeling.ListItems(
                lb.ListItemsRequest(
                    project_id=self.preference_id,
                    source=lb.ITEM_SOURCE_FEEDBACK,
                    page=common_pb2.PageRequest(page_size=500, page_token=token),
                )
            )
            items.update((i.metadata.get("request_id", ""), i) for i in page.items)
            token = page.next_page_token
            if not token:
                break
        request_id = next((r for r in ledger.paired if r in items), "")
        if not request_id:
            raise FailedPreconditionError(
                f"no preference item of {self.preference_id} names a regenerate or edit the users sent"
            )
        item = items[request_id]
        rows = self._exported_ids(pref_version)
        job = self.gm.training.GetJob(tr.GetJobRequest(job_id=dpo_job_id))
        version = next(
            v
            for v in self.gm.registry.ListModelVersions(
                rg.ListModelVersionsRequest(registered_model_name=self.model)
            ).model_versions
            if v.lineage.training_job_id == dpo_job_id
        )
        return {
            "request_id": request_id,
            "model_version_answered": int(item.metadata.get("model_version", "0") or 0),
            "preference_item_id": item.item_id,
            "dataset_version_id": pref_version["id"],
            "in_published_rows": item.item_id in rows,
            "dpo_job_id": dpo_job_id,
            "job_trained_on": job.spec.dataset_version.dataset_version_id,
            "version": version.version,
            "version_trained_on": version.lineage.dataset_version.dataset_version_id,
            "matches": job.spec.dataset_version.dataset_version_id
            == version.lineage.dataset_version.dataset_version_id
            == pref_version["id"],
        }

    def _exported_ids(self, version: dict[str, Any]) -> set[str]:
        """The row ids of a published version, exported (checksums verified) into the work directory."""
        target = self.options.work_dir / f"export-{version['project']}-v{version['number']}"
        target.mkdir(parents=True, exist_ok=True)
        request = lb.ExportDatasetRequest(project_id=version["project"], dataset_version_id=version["id"])
        written = write_export(self.gm.labeling.ExportDataset(request, timeout=600), target)
        ids: set[str] = set()
        for entry in written:
            path = Path(entry["file"])
            if path.suffix == ".jsonl":
                for line in path.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        ids.add(str(json.loads(line).get("id", "")))
        return ids

    def _versions(self) -> list[dict[str, Any]]:
        ledger = self.summary.get("feedback", {}).get("by_version", {})
        out = []
        for v in self.gm.registry.ListModelVersions(
            rg.ListModelVersionsRequest(registered_model_name=self.model)
        ).model_versions:
            out.append(
                {
                    "version": v.version,
                    "job_id": v.lineage.training_job_id,
                    "objective": v.lineage.hyper_parameters.get("objective", ""),
                    "base_model": v.lineage.base_model.base_model_name,
                    "dataset_version_id": v.lineage.dataset_version.dataset_version_id,
                    "chat_template_sha256": v.lineage.hyper_parameters.get("chat_template.sha256", ""),
                    "metrics": {
                        name: round(value, 4)
                        for name in SHOWN_METRICS
                        if (value := metric_value(v.metrics, name, common_pb2.DATASET_SPLIT_TEST)) is not None
                    },
                    "feedback_sent": ledger.get(str(v.version), {"positive": 0, "negative": 0}),
                    "aliases": sorted(v.aliases),
                    "rolled_back_reason": v.rolled_back_reason,
                }
            )
        return sorted(out, key=lambda r: int(r["version"]))

    def _history(self) -> list[dict[str, Any]]:
        out = []
        for c in reversed(self._changes()):
            entry: dict[str, Any] = {
                "sequence": c.sequence,
                "alias": c.alias,
                "from_version": c.from_version if c.HasField("from_version") else None,
                "to_version": c.to_version if c.HasField("to_version") else None,
                "cause": rg.AliasChangeCause.Name(c.cause).removeprefix("ALIAS_CHANGE_CAUSE_"),
                "reason": c.decision.explanation or c.reason,
            }
            if c.decision.HasField("online"):
                online = c.decision.online
                entry["online"] = {
                    "candidate_positive": online.candidate_positive,
                    "candidate_negative": online.candidate_negative,
                    "baseline_positive": online.baseline_positive,
                    "baseline_negative": online.baseline_negative,
                    "z": round(online.z, 4),
                    "p_value": round(online.p_value, 6),
                }
            out.append(entry)
        return out

    def _aliases(self) -> dict[str, int]:
        model = self.gm.registry.GetRegisteredModel(rg.GetRegisteredModelRequest(name=self.model))
        return dict(sorted(model.aliases.items()))


def _cycle(prompts: Sequence[data.UserPrompt]) -> Iterator[data.UserPrompt]:
    while True:
        yield from prompts


# --------------------------------------------------------------------------- the summary


def _v(version: int | None) -> str:
    return "-" if version is None else f"v{version}"


def print_chat_summary(summary: dict[str, Any], out: TextIO) -> None:
    w = out.write
    total = summary["total_seconds"]
    w(f"\nGristmill chat demo: the flywheel closed in {int(total // 60)}m {total % 60:04.1f}s ({summary['stack']})\n\n")
    w(f"  {'step':<86}{'seconds':>8}\n")
    for step in summary["steps"]:
        w(f"  {step['name']:<86}{step['seconds']:>8.1f}\n")
    w("\n")
    for key in ("chat_dataset", "preference_dataset"):
        v = summary[key]
        w(f"  dataset      {v['project']} v{v['number']}: train {v['train']} / validation {v['validation']} / test "
          f"{v['test']} ({v['row_format']})\n")  # fmt: skip
    w(f"  routing      {summary.get('routing', '')}\n")
    for v in summary["versions"]:
        metrics = ", ".join(f"{k} {x:.3f}" for k, x in v["metrics"].items()) or "no test metrics"
        sent = v["feedback_sent"]
        aliases = f" [{', '.join(v['aliases'])}]" if v["aliases"] else ""
        w(f"  version      v{v['version']}{aliases} {v['objective'] or '?'} on {v['base_model']}, job {v['job_id']}: "
          f"{metrics}; users judged {sent['positive']} replies good / {sent['negative']} bad\n")  # fmt: skip
        if v["rolled_back_reason"]:
            w(f"               rolled back: {v['rolled_back_reason']}\n")
    gate = summary["gate"]
    o = gate["online"]
    w(f"  online gate  {gate['decision']} v{gate['candidate_version']} ({gate['alias']} "
      f"{_v(gate['from_version'])} -> {_v(gate['to_version'])}): candidate {o['candidate_positive']}+/"
      f"{o['candidate_negative']}- vs baseline {o['baseline_positive']}+/{o['baseline_negative']}-, z {o['z']:.3f}, "
      f"p {o['p_value']:.4f}\n")  # fmt: skip
    w(f"               {gate['reason']}\n")
    for change in summary["history"]:
        w(f"  history      #{change['sequence']} {change['alias']}: {_v(change['from_version'])} -> "
          f"{_v(change['to_version'])} ({change['cause'].lower()}) {change['reason'][:90]}\n")  # fmt: skip
    f = summary["feedback"]
    kinds = ", ".join(f"{k} {n}" for k, n in f["by_kind"].items())
    w(
        f"  feedback     {f['conversations']} conversations, {f['requests']} replies; {f['sent']} feedback sent "
        f"({kinds})\n"
    )
    since = ", ".join(f"v{v} {c['positive']}+/{c['negative']}-" for v, c in f["since_candidate"].items())
    w(f"               replies judged since the candidate moved: {since} (the gate decided on its own count)\n")
    lineage = summary["lineage"]
    w(f"  lineage      request {lineage['request_id']} (answered by v{lineage['model_version_answered']}) -> "
      f"preference item {lineage['preference_item_id']} -> dataset {lineage['dataset_version_id']} (in its rows: "
      f"{lineage['in_published_rows']}) -> job {lineage['dpo_job_id']} -> v{lineage['version']}\n")  # fmt: skip
    services = summary["trace"]["services"]
    seen = ", ".join(f"{name} {count}" for name, count in services.items()) or "none"
    w(f"  trace        {summary['trace']['trace_id']}\n")
    w(f"               service log lines in this trace: {seen}\n")
