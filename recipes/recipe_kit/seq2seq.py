"""Sequence-to-sequence tasks (translation, summarization): tokenizer, model, label-smoothed loss, generation.

With ``--model_config`` (or no model argument) the model is built from a config and the tokenizer needs no
download: ``--tokenizer train`` fits a BPE tokenizer on the training texts (source and target share it, as T5's
single embedding does; Panahi, section 4.4.1), ``--tokenizer byte`` is ByT5's byte-level tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .arguments import RecipeArguments
from .data import Pairs, load_text_pairs
from .errors import RecipeError
from .loop import Task
from .modeling import build_config
from .presets import apply_compression


PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


# The model of the no-argument runs: a small T5 built from a config (no download).
SMALL_T5 = dict(
    model_type="t5", d_model=64, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16, dropout_rate=0.1
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BPE tokenizer fitted on ``texts``: ids 0, 1, 2 are pad, eos, unk (T5's layout); eos is appended."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], show_progress=False)
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, tokenizer.token_to_id(EOS))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def build_tokenizer(arguments: RecipeArguments, splits: dict[str, Pairs]) -> PreTrainedTokenizerBase:
    model_args = arguments.model
    choice = model_args.tokenizer or ("pretrained" if model_args.model_name_or_path else "train")
    if choice == "train":
        texts = (text for source, target in splits["train"] for text in (source, target))
        return train_tokenizer(texts, model_args.tokenizer_vocab_size)
    if choice == "byte":
        return ByT5Tokenizer()
    name = model_args.model_name_or_path if choice == "pretrained" else choice
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise RecipeError(f"--tokenizer {name}: {str(error).strip().splitlines()[0]}") from None


def build_seq2seq_model(
    arguments: RecipeArguments, tokenizer: PreTrainedTokenizerBase, default_config: dict[str, Any]
) -> torch.nn.Module:
    """Pretrained, or from a config (default: the recipe's small one) sized to the tokenizer; then compressed."""
    model_args = arguments.model
    if model_args.model_name_or_path:
        config = build_config(model_args, default_config)
        model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path, config=config)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    else:
        ids = dict(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        config = build_config(model_args, default_config, **ids)
        if not config.is_encoder_decoder:
            raise RecipeError(f"--model_config: {config.model_type} is not an encoder-decoder model")
        model = AutoModelForSeq2SeqLM.from_config(config)
    return apply_compression(model, arguments.preset, model_args.init, model_args.untie_lm_head)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, max_length=max_length, truncation=True)["input_ids"]


def seq2seq_task(
    name: str,
    arguments: RecipeArguments,
    builtin: Callable[[], dict],
    default_columns: tuple[str, str],
    metric: Callable[[list[str], list[str]], dict[str, float]],
    default_config: dict[str, Any],
) -> Task:
    """Data, tokenizer, model, loss and evaluation of a translation / summarization recipe."""
    data_args, train_args = arguments.data, arguments.train
    splits = load_text_pairs(data_args, default_columns, builtin, train_args.seed)
    tokenizer = build_tokenizer(arguments, splits)
    model = build_seq2seq_model(arguments, tokenizer, default_config)
    eval_split = "test" if "test" in splits else "validation"

    def encode(pairs: Pairs) -> list[tuple[list[int], list[int], int]]:
        sources = _encode(tokenizer, [s for s, _ in pairs], data_args.max_source_length)
        targets = _encode(tokenizer, [t for _, t in pairs], data_args.max_target_length)
        return list(zip(sources, targets, range(len(pairs))))

    references = {split: [target for _, target in splits[split]] for split in ("validation", eval_split)}

    def collate(items: list) -> dict[str, torch.Tensor]:
        batch = tokenizer.pad({"input_ids": [source for source, _, _ in items]}, return_tensors="pt")
        labels = tokenizer.pad({"input_ids": [target for _, target, _ in items]}, return_tensors="pt")
        batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
        batch["example_index"] = torch.tensor([index for _, _, index in items])
        return dict(batch)

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
        return F.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=-100,
            label_smoothing=train_args.label_smoothing,
        )

    def evaluate(model: torch.nn.Module, batches: Iterable, accelerator: Accelerator, split: str) -> dict[str, float]:
        generator = accelerator.unwrap_model(model)
        max_new_tokens = train_args.generation_max_length or data_args.max_target_length
        predictions, indices = [], []
        for batch in batches:
            generated = generator.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                num_beams=train_args.num_beams,
                max_new_tokens=max_new_tokens,
            )
            generated = accelerator.pad_across_processes(generated, dim=1, pad_index=tokenizer.pad_token_id)
            generated, index = accelerator.gather_for_metrics((generated, batch["example_index"]))
            predictions += tokenizer.batch_decode(generated, skip_special_tokens=True)
            indices += index.tolist()
        return metric([p.strip() for p in predictions], [references[split][i] for i in indices])

    train_data = encode(splits["train"])
    return Task(
        name=name,
        model=model,
        train_data=train_data,
        train_lengths=[len(source) + len(target) for source, target, _ in train_data],
        eval_data=encode(splits[eval_split]),
        validation_data=encode(splits["validation"]),
        collate_validation=collate,
        eval_split=eval_split,
        collate_train=collate,
        collate_eval=collate,
        loss=loss,
        evaluate=evaluate,
        save_preprocessing=tokenizer.save_pretrained,
    )
