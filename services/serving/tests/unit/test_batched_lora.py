"""Batched LoRA (``runtime/lora.py``) computes what PEFT's mixed-batch path computes, row by row.

A tiny Llama with three adapters of different ranks and target modules, batches that mix them with rows of the
bare base, prefill and one decoding step; after an adapter is removed; and the models it must leave to PEFT.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gristmill.serving.runtime.lora import BASE_ADAPTER, BatchedLora
from tests.support.tiny_model import make_tiny_llama, make_tiny_lora_adapter

TEXTS = ["the battery lasts all day", "the screen cracked in a week", "great sound for the price"] * 4


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_llama(root / "base", TEXTS)
    made = [
        make_tiny_lora_adapter(base, root / "a", seed=1),
        make_tiny_lora_adapter(base, root / "b", seed=2, rank=8, targets=("q_proj", "k_proj", "o_proj")),
        make_tiny_lora_adapter(base, root / "c", seed=3, rank=2, targets=("gate_proj", "down_proj", "v_proj")),
    ]
    return base, made


def _model(base: Path, adapters: list[Path]) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapters[0]), adapter_name="a")
    for name, directory in zip("bc", adapters[1:], strict=False):
        model.load_adapter(str(directory), adapter_name=name, is_trainable=False)
    return model.eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, **kwargs).logits


def _batched(model: torch.nn.Module, lora: BatchedLora, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
    lora.select(names)
    try:
        return _logits(model, ids)
    finally:
        lora.clear()


@pytest.mark.parametrize(
    "names",
    [
        ["a", "b", "c", BASE_ADAPTER],
        ["b", "b", "a", "a"],
        ["c", "c", "c", "c"],
        [BASE_ADAPTER] * 4,
    ],
)
def test_each_row_gets_what_peft_gives_it(adapters: tuple[Path, list[Path]], names: list[str]) -> None:
    model = _model(*adapters)
    ids = torch.randint(3, 200, (4, 7), generator=torch.Generator().manual_seed(0))
    expected = _logits(model, ids, adapter_names=names)
    lora = BatchedLora()
    assert lora.install(model)
    got = _batched(model, lora, ids, names)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The adapters do change the answer: the comparison could fail.
    if names != [BASE_ADAPTER] * 4:
        assert not torch.allclose(got, _logits(model, ids, adapter_names=[BASE_ADAPTER] * 4), atol=1e-4)


def test_decoding_with_a_cache_matches_too(adapters: tuple[Path, list[Path]]) -> None:
    from transformers import DynamicCache

    model = _model(*adapters)
    names = ["c", BASE_ADAPTER, "a", "b"]
    ids = torch.randint(3, 200, (4, 5), generator=torch.Generator().manual_seed(1))
    step = torch.randint(3, 200, (4, 1), generator=torch.Generator().manual_seed(2))
    results = []
    for batched in (False, True):
        lora = BatchedLora()
        if batched:
            assert lora.install(model)
            lora.select(names)
        kwargs = {} if batched else {"adapter_names": names}
        cache = DynamicCache()
        with torch.inference_mode():
            model(input_ids=ids, cache=cache, use_cache=True, **kwargs)
            results.append(model(input_ids=step, cache=cache, use_cache=True, **kwargs).logits)
        lora.clear()
        lora.uninstall()
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_after_an_adapter_is_removed_the_others_still_match(adapters: tuple[Path, list[Path]]) -> None:
    model = _model(*adapters)
    lora = BatchedLora()
    assert lora.install(model)
    ids = torch.randint(3, 200, (3, 6), generator=torch.Generator().manual_seed(3))
    _batched(model, lora, ids, ["a", "b", "c"])  # stacks built with three adapters
    model.delete_adapter("b")
    assert lora.install(model)
    names = ["c", "a", BASE_ADAPTER]
    torch.testing.assert_close(
        _batched(model, lora, ids, names), _logits(model, ids, adapter_names=names), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError):
        lora.select(["b", "a", "c"])  # gone: a row cannot ask for it


def test_without_a_selection_the_layers_are_peft_s(adapters: tuple[Path, list[Path]]) -> None:
    model = _model(*adapters)
    ids = torch.randint(3, 200, (2, 4), generator=torch.Generator().manual_seed(4))
    model.set_adapter("b")
    expected = _logits(model, ids)
    lora = BatchedLora()
    assert lora.install(model)
    torch.testing.assert_close(_logits(model, ids), expected)


def test_models_it_cannot_compute_stay_on_peft_s_path(adapters: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, made = adapters
    with_head = make_tiny_lora_adapter(base, tmp_path / "head", seed=4, modules_to_save=["lm_head"])
    dora = make_tiny_lora_adapter(base, tmp_path / "dora", seed=5, use_dora=True)
    for extra in (with_head, dora):
        model = _model(base, [made[0], extra])
        lora = BatchedLora()
        assert not lora.install(model)
        assert all("forward" not in vars(m) for m in model.modules())
