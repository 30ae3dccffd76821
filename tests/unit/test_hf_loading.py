"""``model_loading`` turns transformers' Hub kernels off unless the operator set ``USE_HUB_KERNELS``: on a CUDA
device transformers 5 otherwise downloads kernels while a model loads, and fails on a machine without the Hub."""

from __future__ import annotations

import pytest
from transformers.integrations.hub_kernels import _kernels_enabled

from gristmill.core.hf_loading import model_loading


def test_model_loading_turns_hub_kernels_off_as_transformers_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Set, then removed: monkeypatch restores the variable as it was, whatever model_loading() sets.
    monkeypatch.setenv("USE_HUB_KERNELS", "1")
    monkeypatch.delenv("USE_HUB_KERNELS")
    assert _kernels_enabled(), "transformers' default changed: kernels are no longer on unless turned off"
    with model_loading():
        assert not _kernels_enabled()


def test_an_operator_who_turned_hub_kernels_on_keeps_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USE_HUB_KERNELS", "1")
    with model_loading():
        assert _kernels_enabled()
