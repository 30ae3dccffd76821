from __future__ import annotations

from pathlib import Path

from tests.support.tiny_model import make_tiny_bert, minilm_path


def test_tiny_bert_loads_and_classifies(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = make_tiny_bert(tmp_path / "tiny", ["good phone", "bad battery!"], ["negative", "positive"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    batch = tokenizer(["good battery"], return_tensors="pt")
    assert tokenizer.convert_ids_to_tokens(batch["input_ids"][0]) == ["[CLS]", "good", "battery", "[SEP]"]
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, 2)
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_minilm_ships_with_its_package() -> None:
    path = minilm_path()
    assert (path / "config.json").is_file()
    assert any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
