"""One decoding step of SmolLM2 with LoRA adapters: batched LoRA (``runtime/lora.py``) against PEFT's mixed-batch path.

A benchmark, not a test: run it by hand on a quiet machine.

    .venv/bin/python services/serving/benchmarks/lora_step_benchmark.py [--rows 32] [--reps 10]

What runs: SmolLM2-135M-Instruct (fp32, de-quantised once by the generation benchmark into its cache) with the
generation benchmark's two random rank-8 adapters on q/k/v/o, in one process, no server. Each measurement prefills
``--rows`` rows of ``--prompt`` tokens, then times ``--steps`` decoding steps (one token per row, the KV cache
growing as in serving); the step's time is their mean. Five modes, interleaved in every repetition so that the
machine's drift touches each alike: the bare base (adapters disabled), one adapter in every row and two adapters
alternating row by row, each through PEFT's ``adapter_names`` and through batched LoRA. Reports the median of
``--reps`` repetitions per mode and the ratios the serving targets are about (issue 19: two adapters mixed >= 0.9x
the throughput of one). The serving benchmark's adapter part (``generation_benchmark.py --only adapters``) measures
the same through the whole server, with more noise.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation_benchmark import make_adapters, smollm2_dir

MODES = ("base", "peft one", "peft mixed", "batched one", "batched mixed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32, help="sequences decoding together (even)")
    parser.add_argument("--prompt", type=int, default=40, help="prompt tokens per row")
    parser.add_argument("--steps", type=int, default=8, help="decoding steps per measurement")
    parser.add_argument("--reps", type=int, default=10, help="repetitions of every mode")
    args = parser.parse_args()

    import os

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, DynamicCache

    from gristmill.serving.runtime.lora import BatchedLora

    torch.set_num_threads(os.cpu_count() or 1)
    model_dir = smollm2_dir()
    work = Path(tempfile.mkdtemp(prefix="lora-step-"))
    first, second = make_adapters(model_dir, work)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(first), adapter_name="a")
    model.load_adapter(str(second), adapter_name="b", is_trainable=False)
    model.eval()
    rows = {"one": ["a"] * args.rows, "mixed": ["a", "b"] * (args.rows // 2)}
    prompt = torch.randint(10, 40_000, (args.rows, args.prompt), generator=torch.Generator().manual_seed(0))
    lora = BatchedLora()

    @contextlib.contextmanager
    def mode_of(mode: str) -> Iterator[dict[str, Any]]:
        if mode == "base":
            with model.disable_adapter():
                yield {}
        elif mode.startswith("peft"):
            yield {"adapter_names": rows[mode.split()[1]]}
        else:
            assert lora.install(model)
            lora.select(rows[mode.split()[1]])
            try:
                yield {}
            finally:
                lora.clear()
                lora.uninstall()

    def step_ms(mode: str) -> float:
        with mode_of(mode) as extra, torch.inference_mode():
            cache = DynamicCache()
            model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1, **extra)
            token = torch.randint(10, 40_000, (args.rows, 1))
            started = time.perf_counter()
            for _ in range(args.steps):
                model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1, **extra)
            return (time.perf_counter() - started) / args.steps * 1000

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for rep in range(args.reps):
        for mode in MODES:
            times[mode].append(step_ms(mode))
        print(f"repetition {rep + 1}/{args.reps}", file=sys.stderr, flush=True)
    median = {mode: statistics.median(values) for mode, values in times.items()}
    print(f"\n| mode ({args.rows} rows, {torch.get_num_threads()} threads) | decoding step, median ms | min ms |")
    print("| --- | --- | --- |")
    for mode in MODES:
        print(f"| {mode} | {median[mode]:.1f} | {min(times[mode]):.1f} |")
    print(
        f"\n- two adapters mixed / one, throughput: PEFT {median['peft one'] / median['peft mixed']:.2f}, "
        f"batched {median['batched one'] / median['batched mixed']:.2f} (target >= 0.9)"
    )
    print(
        f"- batched / PEFT, throughput: one adapter {median['peft one'] / median['batched one']:.2f}, "
        f"mixed {median['peft mixed'] / median['batched mixed']:.2f}"
    )
    print(
        f"- one adapter's cost over the bare base: PEFT {median['peft one'] / median['base'] - 1:+.1%}, "
        f"batched {median['batched one'] / median['base'] - 1:+.1%}"
    )


if __name__ == "__main__":
    main()
