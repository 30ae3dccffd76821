"""A generator of realistic labeled review sentences for the demo (we cannot ship third-party data).

Sentences are built from templates over products, aspects and opinions, so a small model can learn the
sentiment from the words while the texts stay varied. The output also carries what an import must clean:
exact duplicates, near duplicates (one word changed), contact details to mask, blank lines.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PRODUCTS = [
    "phone",
    "headset",
    "charger",
    "laptop",
    "camera",
    "speaker",
    "keyboard",
    "monitor",
    "router",
    "tablet",
    "blender",
    "vacuum",
    "kettle",
    "watch",
    "printer",
    "mouse",
    "case",
    "cable",
    "battery",
    "lamp",
]
ASPECTS = [
    "battery life",
    "sound quality",
    "build quality",
    "screen",
    "price",
    "customer service",
    "delivery",
    "design",
    "setup",
    "performance",
    "manual",
    "packaging",
    "warranty",
    "fit",
    "weight",
]
POSITIVE = [
    "is excellent",
    "works great",
    "exceeded my expectations",
    "is worth every penny",
    "is fantastic",
    "is really impressive",
    "made me very happy",
    "is solid and reliable",
    "is superb",
    "is a pleasure to use",
    "works perfectly",
    "is better than I hoped",
    "is outstanding",
    "is simply wonderful",
    "feels premium",
]
NEGATIVE = [
    "is terrible",
    "stopped working after a week",
    "was a huge disappointment",
    "is a waste of money",
    "is awful",
    "broke almost immediately",
    "made me really angry",
    "is cheap and flimsy",
    "is useless",
    "is frustrating to use",
    "does not work at all",
    "is worse than I feared",
    "is horrible",
    "is defective",
    "feels fragile",
]
OPENERS = ["", "Honestly, ", "Overall ", "I think ", "To be fair, ", "Sadly, ", "Wow, ", "In short, "]
ENDINGS = [".", "!", ". Would not change a thing.", ". Five stars.", ". Avoid.", ". Returned it.", "..."]
CONTACTS = ["email me at {n}@example.com", "call me on +1 555 010 {n:04d}", "my card 4111 1111 1111 1111"]


@dataclass(frozen=True)
class DemoItem:
    external_id: str
    text: str
    label: str

    def to_json(self) -> str:
        return json.dumps({"external_id": self.external_id, "text": self.text, "label": self.label})


def _sentence(rng: random.Random, positive: bool) -> str:
    product, aspect = rng.choice(PRODUCTS), rng.choice(ASPECTS)
    opinion = rng.choice(POSITIVE if positive else NEGATIVE)
    ending = rng.choice(ENDINGS[:5] if positive else ENDINGS[:3] + ENDINGS[4:])
    opener = rng.choice(OPENERS)
    text = f"{opener}the {aspect} of this {product} {opinion}{ending}"
    return text[0].upper() + text[1:]


def generate(count: int = 400, *, seed: int = 7) -> Iterator[DemoItem]:
    """``count`` labeled items, balanced, deterministic for a seed; about 5% need cleaning on import."""
    rng = random.Random(seed)
    produced: list[DemoItem] = []
    for i in range(count):
        positive = i % 2 == 0
        text = _sentence(rng, positive)
        roll = rng.random()
        if roll < 0.02 and produced:
            text = rng.choice(produced).text  # an exact duplicate
        elif roll < 0.04 and produced:
            words = rng.choice(produced).text.split()
            words[-1] = words[-1].rstrip(".!") + "!!"  # a near duplicate
            text = " ".join(words)
        elif roll < 0.06:
            text = f"{text} {rng.choice(CONTACTS).format(n=i)}"  # contact details to mask
        item = DemoItem(f"demo-{i:05d}", text, "positive" if positive else "negative")
        produced.append(item)
        yield item


def write_jsonl(path: Path, count: int = 400, *, seed: int = 7) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(item.to_json() + "\n" for item in generate(count, seed=seed)))
    return path
