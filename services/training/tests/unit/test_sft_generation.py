"""SFT evaluation by generation: the prompt and reference of a test conversation, ROUGE-L and exact match, the
bounds on what is generated (examples, reply length, context), greedy batches that equal one-by-one generation on
the tiny Llama, and the model card's sample generations."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from gristmill.core.errors import InvalidArgumentError
from gristmill.core.storage import LocalObjectStore
from gristmill.training.devtools import chat_rows
from gristmill.training.domain import spec as d
from gristmill.training.domain.model import Job, JobState
from gristmill.training.domain.publish import MODEL_CARD, ModelPublisher, read_samples
from gristmill.training.domain.runs import LOOP_REPORT_FILE, LOOP_SAMPLES_FILE, RunOutcome
from gristmill.training.ml import chat, modeling
from gristmill.training.ml.loop import GENERATION_EXAMPLES, DirectorySession, ListSink, LoopRunner
from gristmill.training.tasks import training_task
from gristmill.training.tasks.base import GeneratesText, SampleGeneration
from services.training.tests.unit.test_chat_sft import CONVERSATION, _build_arguments, _loop_config


def _no_autocast() -> Any:
    return torch.autocast("cpu", enabled=False)


def json_conversations(count: int) -> list[list[dict[str, str]]]:
    """Conversations whose reference reply is a JSON object with a "sentiment" key (structured output)."""
    labels = ("positive", "negative")
    return [
        [
            {"role": "user", "content": f"classify review {n}"},
            {"role": "assistant", "content": json.dumps({"sentiment": labels[n % 2], "review": n})},
        ]
        for n in range(count)
    ]


# --------------------------------------------------------------------------- scores


def test_the_prompt_is_the_conversation_before_its_last_reply() -> None:
    prompt, reference = chat.prompt_and_reference(CONVERSATION)
    assert prompt == CONVERSATION[:4] and reference == "nice"
    prompt, reference = chat.prompt_and_reference(CONVERSATION[:3])
    assert prompt == CONVERSATION[:2] and reference == "good bad"


@pytest.mark.parametrize(
    ("generation", "reference", "expected"),
    [
        ("the cat sat", "the cat sat", 1.0),
        ("", "", 1.0),
        ("", "the cat", 0.0),
        ("dog", "the cat", 0.0),
        # LCS "the cat" (2 of 3 generated, 2 of 2 reference): F = 2 * (2/3 * 1) / (2/3 + 1) = 0.8.
        ("the black cat", "the cat", 0.8),
        # Order matters: LCS of "cat the" and "the cat" is 1 token: P = R = 1/2.
        ("cat the", "the cat", 0.5),
        # Whitespace tokens: runs of spaces and newlines split alike.
        ("the\n cat  sat", "the cat sat", 1.0),
        # LCS "a b d" (3): P = 3/4, R = 3/5: F = 2PR/(P+R) = 2/3.
        ("a b c d", "a x b y d", 2 / 3),
    ],
)
def test_rouge_l_is_the_f_measure_of_the_longest_common_subsequence(
    generation: str, reference: str, expected: float
) -> None:
    assert chat.rouge_l(generation, reference) == pytest.approx(expected)


def test_lcs_and_exact_match() -> None:
    assert chat.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook pair
    assert chat.lcs_length([], ["a"]) == 0
    assert chat.exact_match("  good bad\n", "good bad") == 1.0 and chat.exact_match("good", "good bad") == 0.0


def test_the_end_of_turn_token_stops_a_reply(tiny_llama: Path) -> None:
    tokenizer = modeling.load_tokenizer(tiny_llama)
    stops = chat.stop_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops


# --------------------------------------------------------------------------- generation, with a scripted model


class ScriptedModel(torch.nn.Module):
    """Replies to each rendered prompt with scripted tokens; records each generate call."""

    def __init__(self, tokenizer: Any, replies: dict[str, list[int]], context: int = 512) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.replies = replies
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.calls: list[dict[str, Any]] = []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config: Any) -> torch.Tensor:
        self.calls.append({"shape": tuple(input_ids.shape), "max_new_tokens": generation_config.max_new_tokens})
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = self.tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
            reply = self.replies[prompt][: generation_config.max_new_tokens]
            reply += [self.tokenizer.pad_token_id] * (generation_config.max_new_tokens - len(reply))
            rows.append(ids + reply)
        return torch.tensor(rows)


def _rendered_prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    prompt, _ = chat.prompt_and_reference(messages)
    return str(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))


def test_replies_are_cut_at_the_end_of_turn_and_scored(tiny_llama: Path) -> None:
    tokenizer = modeling.load_tokenizer(tiny_llama)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversations = chat_rows(7, 3)
    replies = {}
    for n, messages in enumerate(conversations):
        reference = messages[-1]["content"]
        # Three replies are right (then stop, then ramble); the others give a word of the two, then stop.
        text = reference if n < 3 else reference.split()[0]
        replies[_rendered_prompt(tokenizer, messages)] = [
            *tokenizer(text)["input_ids"],
            end,
            *tokenizer("bad")["input_ids"],
        ]
    model = ScriptedModel(tokenizer, replies)
    evaluation = chat.ChatGenerationEvaluation(tokenizer, torch.device("cpu"), _no_autocast, batch_size=4)
    evaluation.add(model, conversations)
    scores = evaluation.scores(evaluation.totals())
    # One of two words: ROUGE-L P = 1, R = 1/2, F = 2/3.
    assert scores == pytest.approx({"exact_match": 3 / 7, "rouge_l": (3 + 4 * 2 / 3) / 7})
    samples = evaluation.samples()
    assert len(samples) == chat.SAMPLE_GENERATIONS == 5
    assert samples[0] == SampleGeneration(
        conversations[0][:-1], conversations[0][-1]["content"], conversations[0][-1]["content"]
    )
    assert [call["shape"][0] for call in model.calls] == [4, 3]


def test_reply_length_is_bounded_by_the_reference_and_the_context(tiny_llama: Path) -> None:
    tokenizer = modeling.load_tokenizer(tiny_llama)
    conversation = chat_rows(1, 5)[0]
    rendered = _rendered_prompt(tokenizer, conversation)
    reference = tokenizer(conversation[-1]["content"])["input_ids"]
    rambling = {rendered: [*reference, *tokenizer(" good" * 40)["input_ids"]]}
    # A model that never stops: the reply is cut at the reference's length plus the margin.
    model = ScriptedModel(tokenizer, rambling)
    evaluation = chat.ChatGenerationEvaluation(tokenizer, torch.device("cpu"), _no_autocast, margin=4)
    evaluation.add(model, [conversation])
    assert model.calls[0]["max_new_tokens"] == len(reference) + 4
    assert evaluation.samples()[0].generation == conversation[-1]["content"] + " good" * 4
    # A context that leaves 2 tokens after the prompt: 2 tokens are generated, whatever the reference.
    prompt_length = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    short = ScriptedModel(tokenizer, rambling, context=prompt_length + 2)
    bounded = chat.ChatGenerationEvaluation(tokenizer, torch.device("cpu"), _no_autocast)
    bounded.add(short, [conversation])
    assert short.calls[0]["max_new_tokens"] == 2
    # A prompt that fills the context is not scored.
    full = ScriptedModel(tokenizer, rambling, context=prompt_length)
    skipped = chat.ChatGenerationEvaluation(tokenizer, torch.device("cpu"), _no_autocast)
    skipped.add(full, [conversation])
    assert not full.calls and skipped.scores(skipped.totals()) == {}


# --------------------------------------------------------------------------- generation, on the tiny Llama


def test_greedy_batches_generate_what_one_prompt_at_a_time_does(tiny_llama: Path) -> None:
    tokenizer = modeling.load_tokenizer(tiny_llama)
    model = modeling.load_causal_lm(tiny_llama).eval()
    conversations = chat_rows(6, 4)  # prompts of different lengths: left padding in a batch
    outputs = []
    for batch_size in (6, 1):
        evaluation = chat.ChatGenerationEvaluation(
            tokenizer, torch.device("cpu"), _no_autocast, batch_size=batch_size, keep=6
        )
        with torch.inference_mode():
            evaluation.add(model, conversations)
        outputs.append([s.generation for s in evaluation.samples()])
    assert outputs[0] == outputs[1] and any(outputs[0])


def test_the_loop_generates_for_a_bounded_share_of_the_test_split_only_at_the_end(
    tiny_llama: Path, tmp_path: Path
) -> None:
    assert isinstance(training_task("chat"), GeneratesText)
    assert not isinstance(training_task("text-classification"), GeneratesText)
    sink = ListSink()
    session = DirectorySession(tmp_path)
    config = _loop_config(tiny_llama, sink, max_steps=2)
    # Six structured-output conversations (JSON replies) among the first 64: the JSON metrics are reported too.
    test = [*json_conversations(6), *chat_rows(GENERATION_EXAMPLES, 3)]
    config = replace(config, examples={**config.examples, "test": test}, json_match_keys=("sentiment", "absent"))
    calls: list[int] = []
    original = chat.ChatGenerationEvaluation.add

    def counting(self: chat.ChatGenerationEvaluation, model: torch.nn.Module, examples: Any) -> None:
        calls.append(len(examples))
        original(self, model, examples)

    chat.ChatGenerationEvaluation.add = counting  # type: ignore[method-assign]
    try:
        LoopRunner(config, 0, 1, 0, session).run()
    finally:
        chat.ChatGenerationEvaluation.add = original  # type: ignore[method-assign]
    assert calls == [GENERATION_EXAMPLES]
    validation = [r["metrics"] for r in sink.records if r["type"] == "eval" and r["split"] == "validation"]
    assert validation and all(set(m) == {"loss", "perplexity"} for m in validation)
    final = session.reports[-1]
    generated = ("test_exact_match", "test_rouge_l", "test_json_valid", "test_json_match_sentiment")
    assert set(generated) <= set(final) and all(0.0 <= final[name] <= 1.0 for name in generated), final
    # No reference holds "absent": no metric for it.
    assert "test_json_match_absent" not in final


def test_generation_metrics_cannot_steer_training() -> None:
    with pytest.raises(InvalidArgumentError, match="measured on the test split only") as caught:
        d.build_early_stopping(metric="rouge_l")
    assert caught.value.details["field"] == "spec.hyper_parameters.early_stopping.metric"


# --------------------------------------------------------------------------- the model card


def test_the_card_shows_the_sample_generations(tmp_path: Path) -> None:
    spec = d.build_spec(
        **_build_arguments(
            task=d.TaskType.CHAT, method=d.Method.LORA, lora=d.build_lora(method=d.Method.LORA, given=False)
        )
    )
    job = Job(job_id="job-1", organization_id="org", spec=spec, state=JobState.RUNNING, create_time=datetime.now(UTC))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "adapter_config.json").write_text("{}")
    report = {"step": 4, "finished": True, "test_loss": 1.5, "test_exact_match": 0.25, "test_rouge_l": 0.5}
    (model_dir / LOOP_REPORT_FILE).write_text(json.dumps(report))
    samples = [
        SampleGeneration([{"role": "user", "content": f"repeat a|b {n}"}], f"a|b {n}", f"a b\n{n} <b>")
        for n in range(5)
    ]
    (model_dir / LOOP_SAMPLES_FILE).write_text(json.dumps([asdict(s) for s in samples]))
    assert read_samples(model_dir) == tuple(samples)
    outcome = RunOutcome(metrics=report, model_dir=model_dir, trainable_parameters=1, total_parameters=2)

    result = ModelPublisher(LocalObjectStore(tmp_path / "objects"), code_version="test").publish(
        job, outcome, label_map=(), dataset_files=()
    )

    card = (model_dir / MODEL_CARD).read_text()
    section = card.split("## Sample generations", 1)[1].split("## Use", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert rows[1:] and len(rows) == 6  # the separator, then one row per sample
    assert rows[1] == r"| 1 | user: repeat a\|b 0 | a\|b 0 | a b 0 &lt;b> |"
    assert "| exact_match | test | 0.2500 |" in card and "| rouge_l | test | 0.5000 |" in card
    assert {f.key.rsplit("/", 1)[-1] for f in result.files} == {"adapter_config.json", MODEL_CARD}


def test_generate_calls_are_bounded_by_prompts_and_by_tokens(tiny_llama: Path) -> None:
    """At most batch_size prompts a call, and at most batch_tokens of padded prompt and reply room: short prompts
    share a call, a long one batches with fewer (one alone may exceed the bound)."""
    tokenizer = modeling.load_tokenizer(tiny_llama)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversations = chat_rows(7, 3)
    replies = {_rendered_prompt(tokenizer, m): [end] for m in conversations}
    model = ScriptedModel(tokenizer, replies)
    chat.ChatGenerationEvaluation(tokenizer, torch.device("cpu"), _no_autocast).add(model, conversations)
    assert [call["shape"][0] for call in model.calls] == [7]
    # Room for three rows of the widest prompt plus the longest reply: calls of three, three and one.
    widest = max(len(tokenizer(_rendered_prompt(tokenizer, m), add_special_tokens=False)["input_ids"]) for m in
                 conversations)  # fmt: skip
    longest = max(len(tokenizer(m[-1]["content"], add_special_tokens=False)["input_ids"]) for m in conversations) + 16
    model.calls.clear()
    bounded = chat.ChatGenerationEvaluation(
        tokenizer, torch.device("cpu"), _no_autocast, batch_tokens=3 * (widest + longest)
    )
    bounded.add(model, conversations)
    assert [call["shape"][0] for call in model.calls] == [3, 3, 1]
    assert all(call["shape"][0] * (call["shape"][1] + call["max_new_tokens"]) <= 3 * (widest + longest)
               for call in model.calls)  # fmt: skip
    model.calls.clear()
    alone = chat.ChatGenerationEvaluation(tokenizer, torch.device("cpu"), _no_autocast, batch_tokens=1)
    alone.add(model, conversations)
    assert [call["shape"][0] for call in model.calls] == [1] * 7
