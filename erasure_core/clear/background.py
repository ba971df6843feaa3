"""Background prompts: everyday captions used as extra negatives for CLEAR's masks.

A feature is *specific* only if it (almost) never fires on negative tokens. The paired
anchors and the preset's retain prompts are few and close to the templates, so
features that fire on unrelated everyday content can look specific and then edit
prompts that have nothing to do with the concept. These captions widen the negative
set (masks and the final fine-tune only; the layer search uses the paired negatives).
Prompts that share a content word with a target are dropped (``background_prompts``).
They avoid named people, artists and anything unsafe, so they never overlap a preset.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

BACKGROUND_PROMPTS: tuple[str, ...] = (
    "a cup of coffee on a wooden desk",
    "a city skyline at dusk",
    "a bowl of soup with bread",
    "children playing football in a park",
    "an old bridge over a river",
    "a laptop next to a notebook",
    "a field of sunflowers under a blue sky",
    "a woman riding a bicycle in the rain",
    "a man cooking pasta in a kitchen",
    "a sailboat on a calm sea",
    "a snowy mountain road",
    "a plate of sushi",
    "a busy market street with vendors",
    "a living room with a grey couch",
    "a horse grazing in a meadow",
    "a lighthouse on a rocky coast",
    "a train crossing a bridge",
    "a bookshelf full of books",
    "a glass of orange juice",
    "an empty parking lot at night",
    "a teacher writing on a blackboard",
    "a forest path covered with leaves",
    "a red umbrella in the street",
    "a chocolate cake on a plate",
    "a fishing boat in a harbor",
    "a desert with sand dunes",
    "a basket of apples",
    "a person jogging along the beach",
    "an airplane taking off",
    "a vase of roses on a table",
    "a small wooden cabin in the woods",
    "a pair of running shoes",
    "students sitting in a classroom",
    "a rainy window with water drops",
    "a farmer driving a tractor",
    "a clock tower in an old town",
    "a bus stop in the morning",
    "a pot of tea and two cups",
    "a waterfall in a green valley",
    "a chess board with pieces",
    "an elderly couple walking hand in hand",
    "a modern office with desks",
    "a guitar leaning against a wall",
    "a hot air balloon in the sky",
    "a garden with vegetables",
    "a bakery window with pastries",
    "a swimming pool in the summer",
    "a motorcycle parked on the street",
    "a cow standing in a barn",
    "a village church on a hill",
    "a pile of autumn leaves",
    "a bird sitting on a branch",
    "a group of friends having dinner",
    "a quiet library reading room",
    "a pizza with tomatoes and cheese",
    "a bridge in the fog",
    "a kite flying over a hill",
    "a street musician playing violin",
    "a frozen lake in winter",
    "a wooden table with candles",
    "a stack of pancakes with syrup",
    "a doctor talking to a patient",
    "a highway through the countryside",
    "a colorful fish in an aquarium",
)

_STOP = {"a", "an", "the", "of", "in", "on", "and", "with", "by", "at", "to", "for", "style", "photo", "painting"}


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOP and len(w) > 1}


def background_prompts(targets: Sequence[str], *, limit: int | None = None) -> list[str]:
    """The background captions that share no content word with any target (first ``limit`` of them)."""
    banned = set().union(*(_words(t) for t in targets)) if targets else set()
    out = [p for p in BACKGROUND_PROMPTS if not (_words(p) & banned)]
    return out[:limit] if limit is not None else out
