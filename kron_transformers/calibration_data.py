"""Calibration data from a file: text lines, a .jsonl column, or an image folder, made into model-input batches.

Used by ``kron-transformers compress --calibration-data FILE`` and ``recipes/compress_pretrained.py``: the
inputs are encoded with the model's own preprocessor (``AutoTokenizer`` / ``AutoImageProcessor`` of the
source checkpoint, which is also copied next to the compressed model).
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def read_calibration_inputs(path: str | Path, text_column: str = "text", limit: int | None = None) -> list:
    """Texts (one a line of a text file, or ``text_column`` of each .jsonl record; .gz allowed) or images
    (every image file under a folder, as RGB ``PIL.Image``), at most ``limit`` of them."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image

        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        if not files:
            raise ValueError(f"calibration data: folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return [Image.open(file).convert("RGB") for file in files]
    if not path.is_file():
        raise ValueError(f"calibration data: {path} does not exist (expected a text file, .jsonl or image folder)")
    jsonl = Path(path.stem).suffix == ".jsonl" if path.suffix == ".gz" else path.suffix == ".jsonl"
    texts = []
    try:
        with _open_text(path) as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                if jsonl:
                    record = json.loads(line)
                    if not isinstance(record, dict) or text_column not in record:
                        columns = list(record) if isinstance(record, dict) else type(record).__name__
                        raise ValueError(
                            f"calibration data: {path} line {number} has no column {text_column!r} (it has "
                            f"{columns}); choose the column with the text-column option"
                        )
                    texts.append(str(record[text_column]))
                else:
                    texts.append(line.rstrip("\n"))
                if limit is not None and len(texts) >= limit:
                    break
    except (UnicodeDecodeError, json.JSONDecodeError, gzip.BadGzipFile, EOFError) as error:
        raise ValueError(f"calibration data: cannot read {path}: {error}") from None
    if not texts:
        raise ValueError(f"calibration data: {path} holds no text")
    return texts


def load_preprocessor(source: str | Path):
    """The tokenizer of ``source`` (a folder or Hub id), else its image processor, else None."""
    from transformers import AutoImageProcessor, AutoTokenizer

    for auto_class in (AutoTokenizer, AutoImageProcessor):
        try:
            return auto_class.from_pretrained(source)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def calibration_batches(
    preprocessor: Any, inputs: list, batch_size: int = 16, max_length: int = 128, group_by_length: bool = True
) -> list[dict[str, Any]]:
    """``inputs`` (texts or images) encoded by ``preprocessor`` into padded batches of model inputs.

    ``group_by_length``: texts are batched in the order of their token count, so a batch holds texts of about
    one length and little padding (on 2,048 Multi30k sentences in batches of 32: 42% of the positions are padding
    in file order, 2% grouped), and the batches are then put in a seeded random order, so that ``kt.distill``,
    which cycles through them, does not see them from shortest to longest (as the ``group_by_length`` sampler of
    transformers' Trainer does). Calibration statistics, reconstruction and distillation then spend their passes
    on real tokens."""
    if preprocessor is None:
        raise ValueError("calibration data: the model has no tokenizer or image processor to encode it with")
    if batch_size < 1:
        raise ValueError(f"calibration data: batch_size must be >= 1, got {batch_size}")
    texts = isinstance(inputs[0], str)
    if texts and not callable(getattr(preprocessor, "batch_decode", None)):
        raise ValueError(
            f"calibration data: text given, but the model's preprocessor is a {type(preprocessor).__name__}"
        )
    if not texts:
        return [
            dict(preprocessor(images=inputs[start : start + batch_size], return_tensors="pt"))
            for start in range(0, len(inputs), batch_size)
        ]
    encoded = preprocessor(inputs, truncation=True, max_length=max_length)  # once; each batch is padded from it
    order = list(range(len(inputs)))
    if group_by_length:
        order.sort(key=lambda index: len(encoded["input_ids"][index]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        features = {key: [values[index] for index in chunk] for key, values in encoded.items()}
        batches.append(dict(preprocessor.pad(features, return_tensors="pt")))
    if group_by_length:
        random.Random(0).shuffle(batches)
    return batches
