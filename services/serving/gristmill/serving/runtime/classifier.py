"""A Hugging Face sequence classifier (safetensors) as a ``Classifier``: fast tokenization and a batched
forward pass on CPU, optionally with dynamic int8 quantisation.

transformers' model code is imported with this module (at service start), so the memory measured for a
load is the model's own, not the one-time cost of importing the library (~200 MB).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from gristmill.core.errors import DataIntegrityError, FailedPreconditionError
from gristmill.core.hf_loading import model_loading
from gristmill.serving.domain.explanations import Explanation, TokenAttribution
from gristmill.serving.domain.model import Quantization
from gristmill.serving.domain.sources import TASK_MULTI_LABEL, Encoded, LoadOptions, ResolvedVersion
from gristmill.serving.runtime.memory import release_memory, resident_bytes
from gristmill.serving.runtime.threads import use_threads_here

log = logging.getLogger(__name__)

_WARMUP_TEXTS = ("warming up the model", "a slightly longer sentence to warm up the model with padding")
# Tokenizers report huge sentinels (1e30) when they have no limit of their own.
_NO_LIMIT = 1_000_000


Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Logits(torch.nn.Module):
    """The model as ``(input_ids, attention_mask) -> logits``: the shape TorchScript tracing needs."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]
        return logits


def trace_forward(model: PreTrainedModel, pad_id: int) -> Forward | None:
    """The model traced with TorchScript, or None when it cannot be traced faithfully.

    A traced forward runs as one C++ graph: less Python per batch (~1 ms of a 6 ms MiniLM forward) and the GIL
    released while it runs, so the gRPC thread and other batches are not held up by it. The trace is checked
    against the eager model on other shapes than it was traced with; any difference keeps the eager model.
    """
    eager = _Logits(model).eval()
    # Any real token id will do (not the padding one): the trace records operations, not values.
    token = min(1000, int(getattr(model.config, "vocab_size", 2)) - 1)
    token = token if token != pad_id else token - 1
    example = (torch.full((2, 7), token, dtype=torch.long), torch.ones((2, 7), dtype=torch.long))
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            # Tracing warns about Python values it records; the check below is what decides.
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(eager, example, check_trace=False)  # type: ignore[no-untyped-call]
            for batch, length in ((1, 3), (5, 19)):
                ids = torch.full((batch, length), token, dtype=torch.long)
                ids[-1, length // 2 :] = pad_id
                mask = (ids != pad_id).long()
                mask[:, 0] = 1
                if not torch.allclose(traced(ids, mask), eager(ids, mask), atol=1e-4, rtol=1e-4):
                    log.warning("the traced model differs from the eager one; serving it eagerly")
                    return None
    except Exception as exc:  # tracing is an optimisation: any failure keeps the eager model
        log.warning("could not trace the model (%s); serving it eagerly", exc)
        return None
    forward: Forward = traced
    return forward


class TransformersClassifier:
    """A loaded sequence-classification model. Thread-safe: inference only reads the weights."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Tokenizer,
        *,
        labels: Sequence[str],
        multi_label: bool,
        max_tokens: int,
        pad_id: int,
        traced: Forward | None = None,
        quantization: Quantization = Quantization.NONE,
    ) -> None:
        # Inference and explanations never need the weights' gradients (explanations take them of the inputs).
        model.requires_grad_(False)
        self._model = model
        self._quantization = quantization
        self._forward: Forward = traced or _Logits(model).eval()
        self.traced = traced is not None
        self._tokenizer = tokenizer
        self._labels = tuple(labels)
        self._multi_label = multi_label
        self._max_tokens = max_tokens
        self._pad_id = pad_id
        self._specials = tokenizer.num_special_tokens_to_add(False)
        self.memory_bytes = 0

    @property
    def labels(self) -> Sequence[str]:
        return self._labels

    @property
    def multi_label(self) -> bool:
        return self._multi_label

    @property
    def max_tokens(self) -> int:
        return self._max_tokens

    def encode(self, texts: Sequence[str], max_tokens: int) -> list[Encoded]:
        # Special tokens are added after truncation, so a truncated text still ends with them ([SEP]).
        budget = max(min(max_tokens, self._max_tokens) - self._specials, 1)
        out = []
        for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False):
            full = len(encoding.ids) + self._specials
            if len(encoding.ids) > budget:
                encoding.truncate(budget)
            out.append(Encoded(self._tokenizer.post_process(encoding).ids, full))
        return out

    def light_load_thread_setup(self, share: int) -> Callable[[], None] | None:
        """How to set up the thread of a batch that runs alone while ``share`` batches could run side by side
        (``DynamicBatcher``): ``share`` times the process default of intra-op threads, at most one per core; None
        when that is no more than every batch has anyway (TORCH_THREADS 0, or as many as the cores)."""
        default = torch.get_num_threads()
        threads = min(os.cpu_count() or 1, default * share)
        return functools.partial(use_threads_here, threads) if threads > default else None

    def predict(self, batch: Sequence[Encoded]) -> Sequence[Sequence[float]]:
        longest = max(item.length for item in batch)
        ids = np.full((len(batch), longest), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, item in enumerate(batch):
            ids[row, : item.length] = item.ids
            mask[row, : item.length] = 1
        with torch.no_grad():
            logits = self._forward(torch.from_numpy(ids), torch.from_numpy(mask))
            probabilities = torch.sigmoid(logits) if self._multi_label else torch.softmax(logits, dim=-1)
        rows: Sequence[Sequence[float]] = list(probabilities.float().numpy())
        return rows

    def explain(
        self, texts: Sequence[str], max_tokens: int, label_indices: Sequence[int], steps: int
    ) -> list[Explanation]:
        """Integrated gradients of each label's probability over the input embeddings (one text at a time).

        The eager model is called with ``inputs_embeds`` rather than hooking its embedding layer: a hook would
        also change the predictions that other threads run through the same modules meanwhile.
        """
        if self._quantization is Quantization.DYNAMIC_INT8:
            raise FailedPreconditionError(
                "this deployment's model is quantised to dynamic int8, which has no gradients to explain it with; "
                "explain with a deployment that is not quantised (quantization NONE or BF16)"
            )
        # Imported here: captum pulls in matplotlib, which a service that never explains should not pay for.
        from captum.attr import IntegratedGradients

        embeddings = self._model.get_input_embeddings()
        budget = max(min(max_tokens, self._max_tokens) - self._specials, 1)
        out = []
        for text, label in zip(texts, label_indices, strict=True):
            encoding = self._tokenizer.encode(text, add_special_tokens=False)
            if len(encoding.ids) > budget:
                encoding.truncate(budget)
            encoding = self._tokenizer.post_process(encoding)
            ids = torch.tensor([encoding.ids], dtype=torch.long)
            special = torch.tensor([encoding.special_tokens_mask], dtype=torch.bool)
            mask = torch.ones_like(ids)
            with torch.no_grad():
                inputs = embeddings(ids)
                # The usual baseline for text: the same special tokens, padding in place of every word.
                baseline = embeddings(torch.where(special, ids, self._pad_id))
                probability, baseline_probability = (
                    float(self._probabilities(x, mask)[0, label]) for x in (inputs, baseline)
                )
            integrated = IntegratedGradients(self._probabilities)
            attributions, delta = integrated.attribute(
                inputs,
                baselines=baseline,
                target=int(label),
                additional_forward_args=(mask,),
                n_steps=steps,
                # Bounds the memory of one forward/backward pass to ~4,096 tokens, whatever the text's length.
                internal_batch_size=max(1, min(steps, 4096 // ids.shape[1])),
                return_convergence_delta=True,
            )
            scores = attributions.sum(dim=-1)[0].float().tolist()
            tokens = tuple(
                TokenAttribution(token, start, end, score)
                for token, (start, end), score, is_special in zip(
                    encoding.tokens, encoding.offsets, scores, encoding.special_tokens_mask, strict=True
                )
                if not is_special
            )
            out.append(Explanation(int(label), tokens, probability, baseline_probability, float(delta[0])))
        return out

    def _probabilities(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self._model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=False)[0]
        return torch.sigmoid(logits) if self._multi_label else torch.softmax(logits, dim=-1)

    def close(self) -> None:
        del self._model, self._forward
        release_memory()


def _labels_of(directory: Path, resolved: ResolvedVersion, num_labels: int) -> list[str]:
    if resolved.label_map:
        labels = list(resolved.label_map)
    else:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        id2label = config.get("id2label") or {}
        labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_labels)]
    if len(labels) != num_labels:
        raise FailedPreconditionError(
            f"version {resolved.version} of {resolved.registered_model_name} has {num_labels} outputs but "
            f"{len(labels)} labels in its label map; register a version whose label map matches the model"
        )
    return labels


def load_transformers_classifier(
    directory: Path, resolved: ResolvedVersion, options: LoadOptions, *, trace: bool = True
) -> TransformersClassifier:
    """Load tokenizer + model from ``directory`` (safetensors only), quantise if asked, warm up; measure memory."""
    if not (directory / "model.safetensors").is_file():
        raise DataIntegrityError(
            f"version {resolved.version} of {resolved.registered_model_name} has no model.safetensors; "
            "serving loads safetensors weights only"
        )
    # Load reports and progress bars are for notebooks; the service logs one line per load instead.
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    release_memory()
    before = resident_bytes()
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(directory)
        with model_loading():
            model = AutoModelForSequenceClassification.from_pretrained(
                directory, dtype=torch.float32, use_safetensors=True
            )
    except (OSError, ValueError, KeyError) as exc:
        raise FailedPreconditionError(
            f"version {resolved.version} of {resolved.registered_model_name} is not a loadable Hugging Face "
            f"sequence classifier: {exc}"
        ) from None
    model.eval()
    if options.quantization is Quantization.DYNAMIC_INT8:
        model = quantize_dynamic_int8(model)
    elif options.quantization is Quantization.BF16:
        model = model.to(torch.bfloat16)
    backend = hf_tokenizer.backend_tokenizer
    tokenizer = Tokenizer.from_str(backend.to_str())
    # The saved tokenizer may pad/truncate to a fixed length; the batcher pads per batch instead.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    config = model.config
    limit = int(getattr(config, "max_position_embeddings", 0) or _NO_LIMIT)
    model_max = int(getattr(hf_tokenizer, "model_max_length", _NO_LIMIT) or _NO_LIMIT)
    if model_max < _NO_LIMIT:
        limit = min(limit, model_max)
    pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else 0
    multi = resolved.task == TASK_MULTI_LABEL or getattr(config, "problem_type", "") == "multi_label_classification"
    classifier = TransformersClassifier(
        model,
        tokenizer,
        labels=_labels_of(directory, resolved, int(config.num_labels)),
        multi_label=multi,
        max_tokens=min(limit, _NO_LIMIT),
        pad_id=int(pad_id),
        traced=trace_forward(model, int(pad_id)) if trace else None,
        quantization=options.quantization,
    )
    del hf_tokenizer
    # Warm up: the first forward passes allocate and pick kernels; do that before taking traffic.
    for size in (1, 4):
        classifier.predict(classifier.encode(list(_WARMUP_TEXTS) * size, classifier.max_tokens)[: size * 2])
    release_memory()
    classifier.memory_bytes = max(resident_bytes() - before, 0)
    log.info(
        "loaded %s version %d (%s, %s): %.1f MB resident",
        resolved.registered_model_name,
        resolved.version,
        options.quantization.value,
        "traced" if classifier.traced else "eager",
        classifier.memory_bytes / 1e6,
    )
    return classifier


def quantize_dynamic_int8(model: PreTrainedModel) -> PreTrainedModel:
    """int8 weights for every Linear layer, activations quantised on the fly (CPU inference)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch marks the eager-mode quantisation API deprecated (moving to torchao); it still works and is
        # the documented dynamic-quantisation path for CPU.
        warnings.simplefilter("ignore")
        quantized: PreTrainedModel = quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {torch.nn.Linear}, dtype=torch.qint8
        )
    return quantized
