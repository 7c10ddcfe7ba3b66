"""The offline default data sets, generated (no download): small, but with structure a model must learn.

- ``translation``: a toy German -> English corpus: a word-for-word lexicon plus German's verb-final word order in
  subordinate clauses ("weil der hund den ball sieht" -> "because the dog sees the ball").
- ``summarization``: news-like documents whose first sentence carries who did what where, among filler
  sentences; the summary is that event ("the bank bought the factory in paris").
- ``images``: 16x16 RGB images of 10 classes (stripes, checkerboards, rings, ... in two colour families) with
  random phase, frequency, brightness and noise.

Each returns ``{"train": ..., "validation": ..., "test": ...}``.
"""

from __future__ import annotations

import numpy as np


NOUNS = {
    "hund": "dog", "katze": "cat", "mann": "man", "frau": "woman", "kind": "child", "vogel": "bird",
    "pferd": "horse", "lehrer": "teacher", "koch": "cook", "arzt": "doctor", "ball": "ball", "apfel": "apple",
    "wagen": "car", "brief": "letter", "tisch": "table", "stuhl": "chair",
}  # fmt: skip
ADJECTIVES = {
    "rote": "red", "grosse": "big", "kleine": "small", "alte": "old", "junge": "young", "schnelle": "fast",
    "blaue": "blue", "muede": "tired",
}  # fmt: skip
VERBS = {"sieht": "sees", "sucht": "seeks", "mag": "likes", "hat": "has", "holt": "fetches", "malt": "paints"}
PLACES = {"im park": "in the park", "am see": "at the lake", "im haus": "in the house", "heute": "today"}
CONJUNCTIONS = {"weil": "because", "wenn": "when", "dass": "that"}

SUBJECTS = ["the bank", "the city", "the team", "the company", "the school", "the hospital", "the museum", "the club"]
ACTIONS = ["bought", "sold", "opened", "closed", "built", "visited", "renamed", "rebuilt"]
OBJECTS = ["the factory", "the bridge", "the station", "the park", "the hotel", "the library", "the market"]
CITIES = ["paris", "berlin", "madrid", "rome", "vienna", "lisbon", "oslo", "prague"]
DAYS = ["monday", "tuesday", "friday", "sunday"]
FILLERS = [
    "officials said the plan had been discussed for {n} months .",
    "a spokesperson declined to comment on the {adj} details .",
    "the decision was welcomed by {n} local groups .",
    "critics called the move {adj} and costly .",
    "the weather in the region was {adj} this week .",
    "more than {n} people attended a {adj} meeting .",
]
FILLER_ADJECTIVES = ["surprising", "long", "unusual", "quiet", "busy", "modest"]


def _pick(rng: np.random.Generator, items) -> str:
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _translation_pair(rng: np.random.Generator) -> tuple[str, str]:
    subject, obj = _pick(rng, NOUNS), _pick(rng, NOUNS)
    adjective, verb, place = _pick(rng, ADJECTIVES), _pick(rng, VERBS), _pick(rng, PLACES)
    de_subject, en_subject = f"der {adjective} {subject}", f"the {ADJECTIVES[adjective]} {NOUNS[subject]}"
    if rng.random() < 0.5:
        return (
            f"{de_subject} {verb} den {obj} {place}",
            f"{en_subject} {VERBS[verb]} the {NOUNS[obj]} {PLACES[place]}",
        )
    conjunction = _pick(rng, CONJUNCTIONS)
    return (
        f"{conjunction} {de_subject} den {obj} {place} {verb}",
        f"{CONJUNCTIONS[conjunction]} {en_subject} {VERBS[verb]} the {NOUNS[obj]} {PLACES[place]}",
    )


def _summarization_pair(rng: np.random.Generator) -> tuple[str, str]:
    subject, action, obj, city = _pick(rng, SUBJECTS), _pick(rng, ACTIONS), _pick(rng, OBJECTS), _pick(rng, CITIES)
    lead = f"on {_pick(rng, DAYS)} {subject} {action} {obj} in {city} , the local paper reported ."
    fillers = [
        _pick(rng, FILLERS).format(n=int(rng.integers(2, 90)), adj=_pick(rng, FILLER_ADJECTIVES))
        for _ in range(int(rng.integers(2, 5)))
    ]
    return " ".join([lead, *fillers]), f"{subject} {action} {obj} in {city}"


def _split(pairs: list[tuple[str, str]], validation: int, test: int) -> dict[str, list[tuple[str, str]]]:
    held_out = validation + test
    return {"train": pairs[held_out:], "validation": pairs[:validation], "test": pairs[validation:held_out]}


def translation(size: int = 6000, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """``(german, english)`` pairs: 200 validation, 200 test, the rest training."""
    rng = np.random.default_rng(seed)
    return _split([_translation_pair(rng) for _ in range(size)], 200, 200)


def summarization(size: int = 4000, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """``(document, summary)`` pairs: 200 validation, 200 test, the rest training."""
    rng = np.random.default_rng(seed)
    return _split([_summarization_pair(rng) for _ in range(size)], 200, 200)


IMAGE_CLASSES = [
    f"{colour} {pattern}"
    for colour in ("warm", "cool")
    for pattern in ("horizontal stripes", "vertical stripes", "checkerboard", "diagonal stripes", "rings")
]


def _pattern(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    frequency = rng.uniform(0.5, 0.9)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == 0:
        wave = np.sin(frequency * y + phase)
    elif kind == 1:
        wave = np.sin(frequency * x + phase)
    elif kind == 2:
        wave = np.sin(frequency * x + phase) * np.sin(frequency * y + phase)
    elif kind == 3:
        wave = np.sin(frequency * (x + y) / np.sqrt(2) + phase)
    else:
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        wave = np.sin(frequency * np.hypot(y - cy, x - cx) + phase)
    return wave


def images(
    size: int = 1200, image_size: int = 16, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """``(images uint8 (N, H, W, 3), labels int64 (N,), class names)``: 100 validation, 100 test, the rest training."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(IMAGE_CLASSES), size=size)
    warm, cool = np.array([0.9, 0.45, 0.2]), np.array([0.2, 0.5, 0.9])
    pictures = np.empty((size, image_size, image_size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        wave = _pattern(int(label) % 5, image_size, rng)
        colour = (warm if label < 5 else cool) * rng.uniform(0.7, 1.0)
        pixels = 0.5 + 0.4 * wave[..., None] * colour + rng.normal(0, 0.08, (image_size, image_size, 3))
        pictures[i] = np.clip(pixels * 255, 0, 255).astype(np.uint8)
    labels = labels.astype(np.int64)
    parts = {"validation": slice(0, 100), "test": slice(100, 200), "train": slice(200, size)}
    return {name: (pictures[part], labels[part], list(IMAGE_CLASSES)) for name, part in parts.items()}
