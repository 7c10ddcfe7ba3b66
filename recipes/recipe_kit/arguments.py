"""Command-line arguments of the recipes: three dataclasses parsed with ``HfArgumentParser``.

Defaults come, in increasing priority, from the dataclasses, the recipe script (its offline default run), the
``--compression`` preset's ``defaults:``, then the command line. Everything is validated here, before any data
is read or any model is built, and a mistake is one ``RecipeError`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from .errors import RecipeError
from .presets import Preset, load_preset


OPTIMIZERS = ("adamw", "lamb")
SCHEDULERS = ("inverse_sqrt", "linear", "constant")
MIXED_PRECISION = ("no", "fp16", "bf16")
INITS = ("svd", "random", "calibrated")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or folder of a pretrained model (downloads); compressed from its weights with --init."
        },
    )
    model_config: str | None = field(
        default=None,
        metadata={"help": "Build the model from a config, no download: a model type (t5, vit, ...) or a config file."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated key=value settings of the model config, e.g. 'd_model=128,num_layers=2'."},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "'train': a BPE tokenizer trained on the training texts; 'byte': ByT5 byte-level; else a Hub id "
            "or folder. Default: the pretrained model's tokenizer, or 'train' for a model built from a config."
        },
    )
    tokenizer_vocab_size: int = field(default=2000, metadata={"help": "Vocabulary size of --tokenizer train."})
    compression: str | None = field(
        default=None,
        metadata={
            "help": "Preset name in recipes/configs, a .yaml/.json file (preset or KronConfig fields), or 'none'."
        },
    )
    init: str | None = field(
        default=None,
        metadata={"help": "Override the preset's init: 'svd' (from pretrained weights), 'random' (from scratch)."},
    )
    untie_lm_head: bool = field(
        default=False,
        metadata={
            "help": "Before training, give the compressed model's tied output head its own dense weight, the "
            "embedding's materialized table (kt.untie_lm_head): only the input embedding stays factorized."
        },
    )

    def __post_init__(self) -> None:
        if self.model_name_or_path and self.model_config:
            raise RecipeError("give --model_name_or_path (pretrained) or --model_config (from a config), not both")
        if self.init is not None and self.init not in INITS:
            raise RecipeError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.tokenizer_vocab_size < 16:
            raise RecipeError(f"--tokenizer_vocab_size must be >= 16, got {self.tokenizer_vocab_size}")


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub data set, e.g. wmt16 or uoft-cs/cifar100."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, e.g. ro-en."})
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Local training data: .jsonl/.json/.csv (optionally .gz), a parallel-text prefix P with files "
            "P.<source_lang> and P.<target_lang>, an image folder (a subfolder per class) or a .npz of images/labels."
        },
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation data (same formats)."})
    test_file: str | None = field(default=None, metadata={"help": "Local test data, evaluated instead of validation."})
    source_column: str | None = field(default=None, metadata={"help": "Column of the input text."})
    target_column: str | None = field(default=None, metadata={"help": "Column of the output text."})
    source_lang: str | None = field(default=None, metadata={"help": "Source language code (parallel text, Hub)."})
    target_lang: str | None = field(default=None, metadata={"help": "Target language code."})
    source_prefix: str = field(default="", metadata={"help": "Prepended to every input (e.g. T5 task prefixes)."})
    image_column: str | None = field(default=None, metadata={"help": "Column of the images (Hub data sets)."})
    label_column: str | None = field(default=None, metadata={"help": "Column of the class labels."})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Held out of the training data when no validation data is given."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training data."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation data."})
    max_source_length: int = field(default=128, metadata={"help": "Maximum input tokens (longer are truncated)."})
    max_target_length: int = field(default=64, metadata={"help": "Maximum output tokens."})

    def __post_init__(self) -> None:
        for name in ("train_file", "validation_file", "test_file"):
            value = getattr(self, name)
            if value is not None and not _local_source_exists(value, self.source_lang, self.target_lang):
                raise RecipeError(f"--{name} {value}: no such file, folder or parallel-text pair")
        if self.dataset_name and self.train_file:
            raise RecipeError("give --dataset_name (Hub) or --train_file (local), not both")
        if (self.validation_file or self.test_file) and not (self.train_file or self.dataset_name):
            raise RecipeError("--validation_file/--test_file need --train_file")
        if not 0 < self.validation_split_percentage < 100:
            raise RecipeError(
                f"--validation_split_percentage must be in (0, 100), got {self.validation_split_percentage}"
            )
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RecipeError(f"--{name} must be >= 1, got {value}")


def _local_source_exists(value: str, source_lang: str | None, target_lang: str | None) -> bool:
    path = Path(value)
    if path.exists():
        return True
    languages = [lang for lang in (source_lang, target_lang) if lang]
    return bool(languages) and all(
        Path(f"{value}.{lang}").exists() or Path(f"{value}.{lang}.gz").exists() for lang in languages
    )


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs", metadata={"help": "Checkpoints, results.json, model and card go here."})
    seed: int = field(default=42, metadata={"help": "Seed of initialization, data order and dropout."})
    full_determinism: bool = field(
        default=False,
        metadata={
            "help": "transformers.enable_full_determinism: deterministic PyTorch algorithms, and kron_transformers "
            "picks each layer's path by counted cost instead of timing, so a seeded run repeats its numbers."
        },
    )
    optimizer: str = field(default="adamw", metadata={"help": f"One of {', '.join(OPTIMIZERS)}."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay."})
    lr_scheduler: str = field(default="inverse_sqrt", metadata={"help": f"One of {', '.join(SCHEDULERS)}."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps of the schedule."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides --num_train_epochs when > 0."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs when --max_steps is not set."})
    max_train_seconds: float | None = field(
        default=None, metadata={"help": "Stop training after this many seconds (a fixed compute budget)."}
    )
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch per process."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the cross-entropy loss."})
    mixed_precision: str = field(default="no", metadata={"help": f"One of {', '.join(MIXED_PRECISION)}."})
    checkpointing_steps: int = field(
        default=0, metadata={"help": "accelerator.save_state every N optimizer steps into output_dir/checkpoints."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoints/step_N folder, or 'latest' in output_dir."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log loss and learning rate every N steps."})
    eval_steps: int = field(
        default=0,
        metadata={
            "help": "Evaluate on the validation split every N optimizer steps (0: only the final evaluation). The "
            "weights of the best validation score are restored before the final evaluation."
        },
    )
    early_stopping_patience: int = field(
        default=0,
        metadata={"help": "Stop after N validation evaluations without improvement (0: never; needs --eval_steps)."},
    )
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "Text: batches of similar lengths (shuffled within chunks of 50 batches, then the batch order), "
            "which pads less."
        },
    )
    report_to: str = field(default="none", metadata={"help": "Accelerate trackers: 'none', 'all', 'tensorboard', ..."})
    num_beams: int = field(default=1, metadata={"help": "Beam size of generation (1 = greedy)."})
    generation_max_length: int | None = field(
        default=None, metadata={"help": "Maximum generated tokens (default: --max_target_length)."}
    )
    kpd_l1: float = field(
        default=0.0,
        metadata={
            "help": "KPD layers: lambda of eq. 4's l1 term on S (Zhu et al.), applied as a proximal step after each "
            "optimizer step (with AdamW in Adam's metric, so an entry of S stays 0 while |dJ/dS| <= lambda)."
        },
    )
    augment: bool = field(default=True, metadata={"help": "Images: random crop and horizontal flip while training."})
    push_to_hub: str | None = field(
        default=None, metadata={"help": "Upload output_dir (without checkpoints) to REPO."}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})

    def __post_init__(self) -> None:
        choices = {"optimizer": OPTIMIZERS, "lr_scheduler": SCHEDULERS, "mixed_precision": MIXED_PRECISION}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise RecipeError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
        for name in (*positive, "num_beams", "logging_steps"):
            if getattr(self, name) < 1:
                raise RecipeError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise RecipeError("set --max_steps > 0 or --num_train_epochs > 0")
        if self.learning_rate <= 0:
            raise RecipeError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_scheduler == "inverse_sqrt" and self.warmup_steps < 1:
            raise RecipeError("--lr_scheduler inverse_sqrt needs --warmup_steps >= 1")
        if not 0 <= self.label_smoothing < 1:
            raise RecipeError(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.kpd_l1 < 0 or self.checkpointing_steps < 0 or self.eval_steps < 0 or self.early_stopping_patience < 0:
            raise RecipeError(
                "--kpd_l1, --checkpointing_steps, --eval_steps and --early_stopping_patience must be >= 0"
            )
        if self.early_stopping_patience and not self.eval_steps:
            raise RecipeError("--early_stopping_patience needs --eval_steps N > 0 (how often to evaluate)")


@dataclass
class RecipeArguments:
    model: ModelArguments
    data: DataArguments
    train: TrainArguments
    preset: Preset

    def to_flat_dict(self) -> dict[str, Any]:
        """All arguments as one flat dict of plain values (for trackers and results.json)."""
        flat = {**dataclasses.asdict(self.model), **dataclasses.asdict(self.data), **dataclasses.asdict(self.train)}
        return {key: value for key, value in flat.items() if value is not None}


DATACLASSES = (ModelArguments, DataArguments, TrainArguments)


def _field_names() -> set[str]:
    return {f.name for cls in DATACLASSES for f in dataclasses.fields(cls)}


# Arguments that only one kind of recipe reads: the others hide them from --help and refuse them.
TEXT_ONLY = (
    "tokenizer",
    "tokenizer_vocab_size",
    "source_column",
    "target_column",
    "source_lang",
    "target_lang",
    "source_prefix",
    "max_source_length",
    "max_target_length",
    "num_beams",
    "generation_max_length",
    "group_by_length",
)
IMAGE_ONLY = ("image_column", "label_column", "augment")


def _refuse_unused(parser: argparse.ArgumentParser, argv: Sequence[str], unused: Sequence[str]) -> None:
    """Hide ``unused`` arguments from ``--help``; a command line that sets one fails with one line."""
    for action in parser._actions:
        if action.dest not in unused:
            continue
        action.help = argparse.SUPPRESS
        for option in action.option_strings:
            if any(arg == option or arg.startswith(option + "=") for arg in argv):
                raise RecipeError(f"{option} does not apply to this recipe")


def parse_arguments(
    script_defaults: dict[str, Any], argv: Sequence[str] | None = None, unused: Sequence[str] = ()
) -> RecipeArguments:
    """Parse ``argv`` over the script's and the preset's defaults; validate; return all arguments.

    ``unused`` names the arguments this recipe does not read (``TEXT_ONLY`` or ``IMAGE_ONLY``).
    """
    unknown = sorted(set(script_defaults) - _field_names())
    if unknown:
        raise TypeError(f"parse_arguments: unknown recipe defaults {unknown}")
    first_pass = argparse.ArgumentParser(add_help=False)
    first_pass.add_argument("--compression", default=script_defaults.get("compression"))
    known, _ = first_pass.parse_known_args(argv)
    preset = load_preset(known.compression)
    unknown = sorted(set(preset.defaults) - _field_names())
    if unknown:
        raise RecipeError(f"--compression {known.compression}: defaults: has unknown arguments {unknown}")
    parser = HfArgumentParser(DATACLASSES)
    _refuse_unused(parser, sys.argv[1:] if argv is None else list(argv), unused)
    parser.set_defaults(**{**script_defaults, **preset.defaults})
    model, data, train = parser.parse_args_into_dataclasses(args=argv)
    return RecipeArguments(model, data, train, preset)
