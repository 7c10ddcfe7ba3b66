"""Compress a pretrained model and keep it: calibrate, compress, reconstruct block by block, distill, evaluate, save.

```bash
python recipes/compress_pretrained.py        # offline default: a tiny BERT from a config, generated text, ~20 s
python recipes/compress_pretrained.py --model_name_or_path DIR_OR_HUB_ID --calibration_file sentences.txt \\
    --compression pretrained_shapeshifter_4x --init calibrated --reconstruct_steps 200 --distill_steps 300
```

Steps: ``--calibration_file`` (text lines, ``.jsonl`` with ``--text_column``, ``.gz`` allowed, or an image folder)
is split into calibration inputs and ``--eval_samples`` held-out ones; the model is compressed with the
``--compression`` preset (``--init`` overriding its init; ``calibrated`` uses the calibration inputs), then
``kt.reconstruct`` refits each factorized linear in closed form (``--refit``, on by default) and fits each
transformer block to the dense one by Adam, and ``kt.distill`` matches the hidden states
(and logits, for models with a head). After each stage the fidelity to the dense model is measured on the
held-out inputs: the mean cosine of mean-pooled last hidden states, the top-1 neighbour agreement (does each
input's nearest other input stay the same), and, for models with logits, the KL divergence and top-1
prediction agreement. The model (safetensors), its tokenizer / image processor, ``results.json`` and a model
card with the measured fidelity go to ``--output_dir``; ``--push_to_hub REPO`` uploads them.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from recipe_kit import builtin
from recipe_kit.errors import RecipeError, run_main
from recipe_kit.presets import load_preset
from recipe_kit.seq2seq import train_tokenizer
from transformers import AutoConfig, HfArgumentParser

import kron_transformers as kt
from kron_transformers.calibration_data import calibration_batches, load_preprocessor, read_calibration_inputs
from kron_transformers.integration.checkpoint import model_class_for
from kron_transformers.reconstruct import TRAINABLE, find_blocks


RESULTS = "results.json"
INITS = ("svd", "calibrated", "random")
# The model of the no-argument run: a tiny BERT with a masked-LM head, built from a config (no download).
TINY_BERT = dict(
    model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    max_position_embeddings=64, initializer_range=0.15, architectures=["BertForMaskedLM"],
)  # fmt: skip


@dataclass
class CompressPretrainedArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or folder of the pretrained model; default: a tiny BERT from a config."},
    )
    model_class: str | None = field(
        default=None, metadata={"help": "transformers class to load it as (default: config.architectures[0])."}
    )
    calibration_file: str | None = field(
        default=None,
        metadata={"help": "Text lines, .jsonl (see --text_column) or an image folder; default: generated text."},
    )
    text_column: str = field(default="text", metadata={"help": "Text field of .jsonl records."})
    calibration_samples: int = field(default=256, metadata={"help": "Inputs used to calibrate, reconstruct, distill."})
    eval_samples: int = field(default=200, metadata={"help": "Held-out inputs (after the calibration ones) for eval."})
    compression: str = field(
        default="pretrained_shapeshifter_4x",
        metadata={"help": "Preset name in recipes/configs, or a .yaml/.json file of KronConfig fields."},
    )
    init: str | None = field(default=None, metadata={"help": f"Override the preset's init: {', '.join(INITS)}."})
    refit: bool = field(
        default=True,
        metadata={
            "help": "Refit each factorized linear in closed form to the dense layer's outputs on the compressed "
            "model's inputs, block by block, before the Adam steps (kt.reconstruct(refit=True))."
        },
    )
    reconstruct_steps: list[int] = field(
        default_factory=lambda: [200],
        metadata={
            "help": "kt.reconstruct Adam steps per block (0: skip): one number for every block, or one per block "
            "in execution order (all-MiniLM-L6-v2, Shapeshifter 4x: 200 200 200 200 200 800 beat 400 per block)."
        },
    )
    reconstruct_lr: float = field(default=1e-3, metadata={"help": "kt.reconstruct learning rate."})
    reconstruct_trainable: str = field(
        default="compressed",
        metadata={
            "help": "What kt.reconstruct fits: the factorized modules ('compressed'), or also the block's norms "
            "and remaining dense layers ('block')."
        },
    )
    distill_steps: int = field(default=300, metadata={"help": "kt.distill steps (0: skip)."})
    distill_lr: float = field(default=1e-3, metadata={"help": "kt.distill peak learning rate."})
    batch_size: int = field(default=16, metadata={"help": "Inputs per batch."})
    max_length: int = field(default=64, metadata={"help": "Maximum tokens per text input."})
    seed: int = field(default=0, metadata={"help": "Seed of the tiny default model and of the optimizers."})
    output_dir: str = field(default="outputs/compress_pretrained", metadata={"help": "Model, results and card."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Upload output_dir to this Hub repo."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})

    def __post_init__(self) -> None:
        if self.init is not None and self.init not in INITS:
            raise RecipeError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        for name in ("calibration_samples", "eval_samples", "batch_size", "max_length"):
            if getattr(self, name) < 2:
                raise RecipeError(f"--{name} must be >= 2, got {getattr(self, name)}")
        if self.distill_steps < 0 or min(self.reconstruct_steps) < 0:
            raise RecipeError(
                f"--reconstruct_steps and --distill_steps must be >= 0, got {self.reconstruct_steps} and "
                f"{self.distill_steps}"
            )
        if self.reconstruct_trainable not in TRAINABLE:
            raise RecipeError(f"--reconstruct_trainable must be one of {', '.join(TRAINABLE)}, got "
                              f"{self.reconstruct_trainable!r}")  # fmt: skip
        if self.calibration_file is not None and not Path(self.calibration_file).exists():
            raise RecipeError(f"--calibration_file {self.calibration_file}: no such file or folder")


def generated_texts(count: int) -> list[str]:
    """English sentences of the offline default corpus (recipe_kit.builtin's translation targets)."""
    pairs = [pair for split in builtin.translation(size=max(count, 100)).values() for pair in split]
    return [target for _, target in pairs][:count]


def load_models(args: CompressPretrainedArguments, texts: list[str] | None):
    """The dense teacher and its preprocessor: the pretrained model, or the tiny default with a trained tokenizer."""
    if args.model_name_or_path is None:
        tokenizer = train_tokenizer(texts, vocab_size=300)
        config = AutoConfig.for_model(**TINY_BERT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(args.seed)
        return model_class_for(config)(config).eval(), tokenizer
    try:
        config = AutoConfig.from_pretrained(args.model_name_or_path)
        model_class = model_class_for(config, args.model_class)
        model = model_class.from_pretrained(args.model_name_or_path).eval()
    except (OSError, ValueError) as error:
        raise RecipeError(f"--model_name_or_path {args.model_name_or_path}: {str(error).splitlines()[0]}") from None
    return model, load_preprocessor(args.model_name_or_path)


def _pooled(hidden: torch.Tensor, batch: dict) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if mask is None:
        return hidden.mean(1)
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def _neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(embeddings, dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2.0)
    return similarity.argmax(-1)


@torch.no_grad()
def _outputs(model, batches: list[dict]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.eval()
    pooled, logits = [], []
    for batch in batches:
        output = model(**batch, output_hidden_states=True)
        pooled.append(_pooled(output.hidden_states[-1], batch))
        if getattr(output, "logits", None) is not None:
            mask = batch.get("attention_mask")
            logits.append(
                output.logits[mask.bool()] if mask is not None and output.logits.dim() == 3 else output.logits
            )
    return torch.cat(pooled), logits


def fidelity(model, dense_outputs, batches: list[dict]) -> dict[str, float]:
    """Cosine and neighbour agreement of pooled hidden states; KL and top-1 agreement of logits when present."""
    reference, reference_logits = dense_outputs
    pooled, logits = _outputs(model, batches)
    metrics = {
        "cosine": float(F.cosine_similarity(pooled, reference).mean()),
        "neighbour_agreement": float((_neighbours(pooled) == _neighbours(reference)).float().mean()),
    }
    if logits:
        student, teacher = torch.cat(logits), torch.cat(reference_logits)
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
        metrics["logit_kl"] = float(kl)
        metrics["top1_agreement"] = float((student.argmax(-1) == teacher.argmax(-1)).float().mean())
    return metrics


def compression_config(args: CompressPretrainedArguments) -> kt.KronConfig:
    preset = load_preset(args.compression)
    if preset.compression is None:
        raise RecipeError("--compression none: this recipe compresses; choose a preset or a KronConfig file")
    overrides = {"init": args.init} if args.init else {}
    return kt.KronConfig.from_dict(preset.compression.to_dict(), **overrides)


def save(model, preprocessor, args: CompressPretrainedArguments, results: dict) -> None:
    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    if preprocessor is not None:
        preprocessor.save_pretrained(output_dir)
    (output_dir / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    metrics = {f"{key} vs dense": value for key, value in results["stages"][results["final_stage"]].items()}
    kt.write_model_card(
        model, output_dir, repo_id=args.push_to_hub, base_model=args.model_name_or_path, metrics=metrics,
        tags=["compress_pretrained"],
    )  # fmt: skip
    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        repo_id = api.create_repo(args.push_to_hub, private=args.hub_private, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message="compress_pretrained recipe")


def main(argv: Sequence[str] | None = None) -> dict:
    (args,) = HfArgumentParser(CompressPretrainedArguments).parse_args_into_dataclasses(args=argv)
    config = compression_config(args)
    total = args.calibration_samples + args.eval_samples
    if args.calibration_file is None:
        inputs = generated_texts(total)
    else:
        try:
            inputs = read_calibration_inputs(args.calibration_file, args.text_column, total)
        except ValueError as error:
            raise RecipeError(str(error)) from None
    if len(inputs) < args.eval_samples + 2:
        raise RecipeError(f"--calibration_file has {len(inputs)} inputs; need more than --eval_samples + 1")
    held_out, calibration_inputs = inputs[-args.eval_samples :], inputs[: -args.eval_samples]
    teacher, preprocessor = load_models(args, calibration_inputs if isinstance(inputs[0], str) else None)
    blocks = find_blocks(teacher)
    if len(args.reconstruct_steps) not in (1, len(blocks)):
        raise RecipeError(
            f"--reconstruct_steps has {len(args.reconstruct_steps)} counts; give one, or one per block of "
            f"{type(teacher).__name__} ({len(blocks)}: {', '.join(blocks)})"
        )
    steps = args.reconstruct_steps[0] if len(args.reconstruct_steps) == 1 else args.reconstruct_steps
    calibration = calibration_batches(preprocessor, calibration_inputs, args.batch_size, args.max_length)
    evaluation = calibration_batches(preprocessor, held_out, args.batch_size, args.max_length)
    dense_outputs = _outputs(teacher, evaluation)

    torch.manual_seed(args.seed)
    stages, seconds, reconstruction = {}, {}, []
    start = time.perf_counter()
    try:
        model = kt.compress_model(copy.deepcopy(teacher), config, calibration_data=calibration)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"--compression {args.compression}: {error}") from None
    seconds["compress"] = time.perf_counter() - start
    stages[f"compressed ({config.init})"] = fidelity(model, dense_outputs, evaluation)
    if any(args.reconstruct_steps) or args.refit:
        start = time.perf_counter()
        report = kt.reconstruct(
            model,
            teacher,
            calibration,
            steps=steps,
            lr=args.reconstruct_lr,
            trainable=args.reconstruct_trainable,
            refit=args.refit,
        )
        seconds["reconstruct"] = time.perf_counter() - start
        print(report)
        reconstruction = [asdict(block) for block in report.blocks]
        stages["reconstructed"] = fidelity(model, dense_outputs, evaluation)
    if args.distill_steps:
        start = time.perf_counter()
        kt.distill(model, teacher, calibration, steps=args.distill_steps, lr=args.distill_lr)
        seconds["distill"] = time.perf_counter() - start
        stages["distilled"] = fidelity(model, dense_outputs, evaluation)
    final_stage = list(stages)[-1]
    dense_parameters = sum(p.numel() for p in teacher.parameters())
    parameters = sum(p.numel() for p in model.parameters())
    results = {
        "stages": stages,
        "final_stage": final_stage,
        "seconds": seconds,
        "reconstruction": reconstruction,
        "dense_parameters": dense_parameters,
        "parameters": parameters,
        "calibration_inputs": len(calibration_inputs),
        "eval_inputs": len(held_out),
        "arguments": asdict(args),
    }
    for stage, metrics in stages.items():
        print(f"{stage:<22} " + "  ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
    print(f"parameters {dense_parameters} -> {parameters} ({dense_parameters / parameters:.2f}x)")
    save(model, preprocessor, args, results)
    return results


if __name__ == "__main__":
    sys.exit(run_main(main))
