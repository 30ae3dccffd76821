"""Few-labels techniques in the loop: rule-based augmentation and adversarial training on the embeddings (their spec
rules are in test_spec.py)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from gristmill.training.devtools import LABELS, sentiment_rows
from gristmill.training.domain import spec as d
from gristmill.training.ml import augment as A
from gristmill.training.ml.adversarial import EmbeddingAdversary
from gristmill.training.ml.loop import DirectorySession, ListSink, LoopConfig, LoopRunner
from gristmill.training.tasks.text_classification import LabelledText

# -- augmentation --------------------------------------------------------------------------------------------


def test_augmentation_adds_edited_copies_with_their_labels_and_is_seeded() -> None:
    examples = [LabelledText("the battery lasts all day long", 1), LabelledText("it broke after a week", 0)]
    out = A.augment(examples, copies=3, probability=0.3, seed=7)
    assert out[:2] == examples and len(out) == 2 + 3 * 2
    assert [e.label for e in out[2:]] == [1, 0] * 3
    for original, copy in zip(examples * 3, out[2:], strict=True):
        words, edited = original.text.split(), copy.text.split()
        # A swap keeps every word; a deletion keeps some, in order.
        assert sorted(edited) == sorted(words) or (0 < len(edited) < len(words) and _in_order(edited, words))
    assert any(copy.text != original.text for original, copy in zip(examples * 3, out[2:], strict=True))
    assert A.augment(examples, copies=3, probability=0.3, seed=7) == out  # a resumed run sees the same data
    assert A.augment(examples, copies=3, probability=0.3, seed=8) != out
    assert A.augment(examples, copies=0, probability=0.3, seed=7) == examples


def _in_order(part: list[str], whole: list[str]) -> bool:
    rest = iter(whole)
    return all(word in rest for word in part)


def test_edits_never_empty_a_text() -> None:
    rng = random.Random(0)
    assert A.random_deletion(["a", "b"], 1.0, rng) in (["a"], ["b"])
    assert A.random_deletion(["alone"], 1.0, rng) == ["alone"]
    assert A.random_swap(["alone"], 3, rng) == ["alone"]
    assert all(A.edit("two words", 0.5, rng) for _ in range(50))


# -- adversarial training -------------------------------------------------------------------------------------


def _tiny_classifier(frozen_embeddings: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Flatten(), torch.nn.Linear(8 * 5, 2))
    model[0].weight.requires_grad_(not frozen_embeddings)
    return model


def _embed(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The embedding layer's output without its hooks."""
    return torch.nn.functional.embedding(ids, model[0].weight)


@pytest.mark.parametrize("frozen", [False, True])
def test_the_adversary_pushes_each_sequence_by_epsilon_along_its_loss_gradient(frozen: bool) -> None:
    """Frozen embeddings (LoRA) or trained ones: the perturbation is the same, and the adversarial pass adds its
    gradients to the clean pass's."""
    model = _tiny_classifier(frozen)
    ids, labels = torch.randint(0, 20, (4, 5)), torch.tensor([0, 1, 0, 1])
    cross_entropy = torch.nn.functional.cross_entropy
    # The expected perturbation, computed by hand: epsilon times each sequence's normalised gradient.
    embedded = _embed(model, ids).detach().requires_grad_()
    cross_entropy(model[2](model[1](embedded)), labels).backward()
    assert embedded.grad is not None
    expected = 0.5 * embedded.grad / embedded.grad.flatten(1).norm(dim=1).view(-1, 1, 1)
    model.zero_grad()

    adversary = EmbeddingAdversary(model[0], epsilon=0.5)
    clean = cross_entropy(model(ids), labels)
    clean.backward()
    clean_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert adversary.perturb()
    with torch.no_grad():
        pushed = _embed(model, ids) + expected
        assert torch.allclose(model(ids), model[2](model[1](pushed)), atol=1e-5)
    assert pushed.sub(_embed(model, ids)).flatten(1).norm(dim=1).tolist() == pytest.approx([0.5] * 4, rel=1e-4)
    adversarial = cross_entropy(model(ids), labels)
    assert adversarial.item() > clean.item()  # pushed along the gradient: the loss rises
    adversarial.backward()
    adversary.clear()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(clean_grads) and all(
        not torch.allclose(a, b) for a, b in zip(grads, clean_grads, strict=True)
    )
    assert adversary.perturb() is False  # the adversarial pass records nothing
    with torch.no_grad():  # evaluation: the layer is left alone
        assert torch.equal(model(ids), model[2](model[1](_embed(model, ids))))
    adversary.remove()


# -- in the loop ---------------------------------------------------------------------------------------------


def _config(model: Path, sink: Any, few_labels: d.FewLabels) -> LoopConfig:
    def examples(n: int, seed: int) -> list[LabelledText]:
        return [LabelledText(t, LABELS.index(label)) for t, label in sentiment_rows(n, seed)]

    hyper = d.build_hyper_parameters(
        method=d.Method.FULL, learning_rate=1e-2, epochs=2, per_worker_batch_size=8, log_every_steps=1
    )
    return LoopConfig(
        job_id="few",
        model_dir=str(model),
        label_map=LABELS,
        examples={"train": examples(32, 1), "test": examples(16, 3)},
        method=d.Method.FULL,
        lora=None,
        hyper=dataclasses.replace(hyper, few_labels=few_labels),
        sink=sink,
    )


def test_the_loop_trains_on_augmented_copies_and_with_the_adversary(tiny_model: Path, tmp_path: Path) -> None:
    plain, both = ListSink(), ListSink()
    LoopRunner(_config(tiny_model, plain, d.FewLabels()), 0, 1, 0, DirectorySession(tmp_path / "a")).run()
    few = d.build_few_labels(augmentation_copies=2, adversarial_epsilon=1.0)
    LoopRunner(_config(tiny_model, both, few), 0, 1, 0, DirectorySession(tmp_path / "b")).run()
    started = next(r for r in plain.records if r["type"] == "started")
    augmented = next(r for r in both.records if r["type"] == "started")
    # 32 examples in batches of 8 for 2 epochs; three times the examples with 2 copies each.
    assert (started["total_steps"], augmented["total_steps"]) == (8, 24)
    losses = [r["metrics"]["loss"] for r in both.records if r["type"] == "train"]
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses)))
