"""Data for the recipes: Hub data sets by name, local files, or the built-in generated sets.

Text (translation, summarization) becomes ``{split: [(source, target), ...]}``; images become
``{split: ImageSplit}`` (uint8 ``(N, H, W, 3)`` arrays, int labels, class names). Splits are ``train``,
``validation`` and, when given, ``test``; a missing validation split is held out of the training data.

Local text: ``.jsonl``/``.json``/``.csv``/``.tsv`` (optionally ``.gz``) with source/target columns, or a
Multi30k/fairseq-style parallel pair ``PREFIX.<source_lang>`` + ``PREFIX.<target_lang>`` (one sentence a line,
optionally ``.gz``). Local images: a folder with one subfolder of images per class, or a ``.npz`` with
``images`` (N, H, W, 3) uint8, ``labels`` and optionally ``classes``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arguments import DataArguments
from .errors import RecipeError


TABULAR_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
Pairs = list[tuple[str, str]]


@dataclass
class ImageSplit:
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def _open_text(path: Path) -> io.TextIOBase:
    try:
        return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")
    except OSError as error:
        raise RecipeError(f"cannot read {path}: {error.strerror or error}") from None


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def _read_rows(path: Path) -> list[dict]:
    suffix = _base_suffix(path)
    try:
        with _open_text(path) as handle:
            if suffix == ".json":
                text = handle.read()
                rows = json.loads(text) if text.lstrip().startswith("[") else _json_lines(text.splitlines(), path)
            elif suffix == ".jsonl":
                rows = _json_lines(handle, path)
            else:
                rows = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, gzip.BadGzipFile, EOFError) as error:
        raise RecipeError(f"cannot read {path} as {suffix.lstrip('.')}: {error}") from None
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise RecipeError(f"{path} holds no records (expected one object per line / row with named columns)")
    return rows


def _json_lines(lines, path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise RecipeError(f"{path} line {number} is not JSON: {error}") from None
    return rows


def _columns_pairs(rows: list[dict], source: str, target: str, where: str) -> Pairs:
    columns = list(rows[0])
    missing = [name for name in (source, target) if name not in columns]
    if missing:
        raise RecipeError(
            f"{where} has no column {', '.join(map(repr, missing))}; its columns are {columns} "
            f"(choose with --source_column/--target_column)"
        )
    return [(str(row[source]), str(row[target])) for row in rows]


def _parallel_file(prefix: str, lang: str) -> Path:
    for candidate in (Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")):
        if candidate.exists():
            return candidate
    raise RecipeError(f"parallel text {prefix}: no file {prefix}.{lang} (or .gz)")


def _read_lines(path: Path) -> list[str]:
    try:
        with _open_text(path) as handle:
            return [line.rstrip("\n") for line in handle]
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as error:
        raise RecipeError(f"cannot read {path} as UTF-8 text: {error}") from None


def read_text_file(value: str, args: DataArguments, default_columns: tuple[str, str]) -> Pairs:
    """One local file (tabular) or parallel-text prefix as ``(source, target)`` pairs."""
    path = Path(value)
    if path.is_file() and _base_suffix(path) in TABULAR_SUFFIXES:
        source, target = args.source_column or default_columns[0], args.target_column or default_columns[1]
        return _columns_pairs(_read_rows(path), source, target, str(path))
    if not (args.source_lang and args.target_lang):
        raise RecipeError(
            f"{value}: not a {'/'.join(TABULAR_SUFFIXES)} file; for parallel text PREFIX.<lang> give "
            f"--source_lang and --target_lang"
        )
    sources = _read_lines(_parallel_file(value, args.source_lang))
    targets = _read_lines(_parallel_file(value, args.target_lang))
    if len(sources) != len(targets):
        raise RecipeError(
            f"parallel text {value}: {len(sources)} {args.source_lang} lines but "
            f"{len(targets)} {args.target_lang} lines"
        )
    return list(zip(sources, targets))


def _hub_splits(args: DataArguments) -> dict:
    import datasets

    try:
        loaded = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    except Exception as error:  # noqa: BLE001 - datasets raises many types; the user needs its message on one line
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"--dataset_name {args.dataset_name}: {message}") from None
    names = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation", "test": "test"}
    return {names[name]: split for name, split in loaded.items() if name in names}


def _hub_text(args: DataArguments, default_columns: tuple[str, str]) -> dict[str, Pairs]:
    splits = {}
    for name, split in _hub_splits(args).items():
        columns = split.column_names
        if "translation" in columns and args.source_column is None:
            if not (args.source_lang and args.target_lang):
                raise RecipeError(
                    f"{args.dataset_name} has a 'translation' column; give --source_lang and --target_lang"
                )
            splits[name] = [(row[args.source_lang], row[args.target_lang]) for row in split["translation"]]
        else:
            source = args.source_column or default_columns[0]
            target = args.target_column or default_columns[1]
            missing = [column for column in (source, target) if column not in columns]
            if missing:
                raise RecipeError(
                    f"{args.dataset_name} ({name}) has no column {', '.join(map(repr, missing))}; its columns are "
                    f"{columns} (choose with --source_column/--target_column)"
                )
            splits[name] = list(zip(map(str, split[source]), map(str, split[target])))
    return splits


def _finish(splits: dict, args: DataArguments, seed: int, take: Callable) -> dict:
    """Hold out a validation split when missing, then apply --max_train_samples/--max_eval_samples."""
    if "train" not in splits:
        raise RecipeError("no training data (give --train_file or a --dataset_name with a train split)")
    if "validation" not in splits:
        train = splits["train"]
        order = np.random.default_rng(seed).permutation(len(train))
        held_out = max(1, int(len(train) * args.validation_split_percentage / 100))
        splits["validation"], splits["train"] = take(train, order[:held_out]), take(train, order[held_out:])
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_eval_samples}
    for name, limit in limits.items():
        if name in splits and limit is not None:
            splits[name] = take(splits[name], np.arange(min(limit, len(splits[name]))))
        if name in splits and len(splits[name]) == 0:
            raise RecipeError(f"the {name} split is empty")
    return splits


def _take_pairs(pairs: Pairs, indices: np.ndarray) -> Pairs:
    return [pairs[int(i)] for i in indices]


def load_text_pairs(
    args: DataArguments, default_columns: tuple[str, str], builtin: Callable[[], dict], seed: int
) -> dict[str, Pairs]:
    """``{split: [(source, target)]}`` from the Hub, local files, or ``builtin()`` when neither is given."""
    if args.dataset_name:
        splits = _hub_text(args, default_columns)
    elif args.train_file:
        files = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}
        splits = {name: read_text_file(value, args, default_columns) for name, value in files.items() if value}
    else:
        splits = builtin()
    if args.source_prefix:
        splits = {name: [(args.source_prefix + s, t) for s, t in pairs] for name, pairs in splits.items()}
    return _finish(splits, args, seed, _take_pairs)


def _read_npz(path: Path) -> ImageSplit:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise RecipeError(f"cannot read {path} as .npz: {error}") from None
    missing = [name for name in ("images", "labels") if name not in arrays]
    if missing:
        raise RecipeError(f"{path} has no array {', '.join(map(repr, missing))}; its arrays are {sorted(arrays)}")
    images, labels = arrays["images"], arrays["labels"].astype(np.int64)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise RecipeError(
            f"{path}: expected images uint8 (N, H, W, 3) and N labels, got images {images.dtype} {images.shape} "
            f"and {len(labels)} labels"
        )
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else [str(i) for i in range(labels.max() + 1)]
    return ImageSplit(images, labels, classes)


def _read_image_folder(path: Path, classes: list[str] | None = None) -> ImageSplit:
    from PIL import Image, UnidentifiedImageError

    found = sorted(entry.name for entry in path.iterdir() if entry.is_dir())
    if not found:
        raise RecipeError(f"image folder {path} has no class subfolders (expected {path}/<class>/<image>)")
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise RecipeError(f"image folder {path} has classes {unknown} that the training folder lacks")
    images, labels, size = [], [], None
    for label, name in enumerate(classes):
        for file in sorted((path / name).iterdir()) if (path / name).is_dir() else []:
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as image:
                    image = image.convert("RGB")
                    size = size or image.size
                    images.append(np.asarray(image.resize(size) if image.size != size else image, dtype=np.uint8))
            except (OSError, UnidentifiedImageError) as error:
                raise RecipeError(f"cannot read image {file}: {error}") from None
            labels.append(label)
    if not images:
        raise RecipeError(f"image folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return ImageSplit(np.stack(images), np.asarray(labels, dtype=np.int64), classes)


def read_image_source(value: str, classes: list[str] | None = None) -> ImageSplit:
    path = Path(value)
    if path.is_dir():
        return _read_image_folder(path, classes)
    if path.suffix == ".npz":
        return _read_npz(path)
    raise RecipeError(f"{value}: expected an image folder (one subfolder per class) or a .npz file")


def _hub_images(args: DataArguments) -> dict[str, ImageSplit]:
    splits = {}
    for name, split in _hub_splits(args).items():
        image_column = args.image_column or next((c for c in ("img", "image") if c in split.column_names), "image")
        label_column = args.label_column or next(
            (c for c in ("label", "fine_label", "labels") if c in split.column_names), "label"
        )
        missing = [c for c in (image_column, label_column) if c not in split.column_names]
        if missing:
            raise RecipeError(
                f"{args.dataset_name} ({name}) has no column {', '.join(map(repr, missing))}; its columns are "
                f"{split.column_names} (choose with --image_column/--label_column)"
            )
        feature = split.features[label_column]
        classes = list(getattr(feature, "names", None) or map(str, range(max(split[label_column]) + 1)))
        images = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in split[image_column]])
        splits[name] = ImageSplit(images, np.asarray(split[label_column], dtype=np.int64), classes)
    return splits


def _take_images(split: ImageSplit, indices: np.ndarray) -> ImageSplit:
    return ImageSplit(split.images[indices], split.labels[indices], split.classes)


def load_images(args: DataArguments, builtin: Callable[[], dict], seed: int) -> dict[str, ImageSplit]:
    """``{split: ImageSplit}`` from the Hub, local folders / ``.npz`` files, or ``builtin()``."""
    if args.dataset_name:
        splits = _hub_images(args)
    elif args.train_file:
        splits = {"train": read_image_source(args.train_file)}
        for name, value in (("validation", args.validation_file), ("test", args.test_file)):
            if value:
                splits[name] = read_image_source(value, splits["train"].classes)
    else:
        splits = {name: ImageSplit(*parts) for name, parts in builtin().items()}
    return _finish(splits, args, seed, _take_images)
