"""Loop building blocks: shards, batches, metrics, learning-rate schedule."""

from __future__ import annotations

import itertools

import pytest
import torch

from gristmill.training.ml import data as D


def test_epoch_shards_are_equal_disjoint_and_reshuffled_each_epoch() -> None:
    shards = [D.epoch_shard(103, epoch=0, seed=7, rank=r, world_size=4) for r in range(4)]
    assert {len(s) for s in shards} == {25}  # 3 examples left out so every rank runs the same batches
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == 100
    assert D.epoch_shard(103, epoch=1, seed=7, rank=0, world_size=4) != shards[0]
    assert D.epoch_shard(103, epoch=0, seed=7, rank=0, world_size=4) == shards[0]


def test_evaluation_shards_cover_every_example_once() -> None:
    shards = [D.eval_shard(10, rank=r, world_size=3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))


def test_steps_per_epoch_counts_partial_batches_and_accumulation() -> None:
    assert D.steps_per_epoch(100, batch_size=16, world_size=1, accumulation=1) == 7
    assert D.steps_per_epoch(100, batch_size=16, world_size=2, accumulation=1) == 4
    assert D.steps_per_epoch(100, batch_size=16, world_size=1, accumulation=4) == 2


def test_collate_pads_to_the_longest_example_of_the_batch() -> None:
    split = D.EncodedSplit(input_ids=[[1, 2, 3], [4], [5, 6]], labels=[0, 1, 1])
    batch = D.collate(split, [1, 2], pad_id=0)
    assert batch.input_ids.tolist() == [[4, 0], [5, 6]]
    assert batch.attention_mask.tolist() == [[1, 0], [1, 1]]
    assert batch.labels.tolist() == [1, 1]
    assert batch.tokens == int(batch.attention_mask.sum()) == 3  # padding is not trained on


def test_scores_compute_accuracy_and_macro_f1() -> None:
    confusion = torch.zeros((3, 3), dtype=torch.long)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 1, 1, 1, 2, 0])
    D.confusion_update(confusion, labels, predictions)
    result = D.scores(confusion, loss_sum=3.0)
    assert result.accuracy == pytest.approx(4 / 6)
    # Per class: F1(0) = 2*1/(2+2) = 0.5, F1(1) = 2*2/(3+2) = 0.8, F1(2) = 2*1/(1+2) = 2/3.
    assert result.f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert result.loss == pytest.approx(0.5) and result.count == 6


def test_improvement_respects_goal_and_min_delta() -> None:
    assert D.improved(0.5, None, maximize=True, min_delta=0.0)
    assert D.improved(0.52, 0.5, maximize=True, min_delta=0.01)
    assert not D.improved(0.505, 0.5, maximize=True, min_delta=0.01)
    assert D.improved(0.3, 0.5, maximize=False, min_delta=0.0)
    assert not D.improved(0.6, 0.5, maximize=False, min_delta=0.0)


def test_learning_rate_warms_up_then_decays() -> None:
    factors = [D.learning_rate_factor(s, total=10, warmup=2, schedule="linear") for s in range(11)]
    assert factors[:3] == [0.0, 0.5, 1.0]
    assert factors[-1] == 0.0 and all(a >= b for a, b in itertools.pairwise(factors[2:]))
    assert D.learning_rate_factor(6, total=10, warmup=2, schedule="cosine") == pytest.approx(0.5)
    assert D.learning_rate_factor(9, total=10, warmup=2, schedule="constant") == 1.0
