"""Summarization recipe: any ``AutoModelForSeq2SeqLM`` (T5 by default), compressed with ``--compression``.

```bash
python recipes/summarization.py                    # offline default: small T5 from a config, built-in corpus
python recipes/summarization.py --compression summarization_word2ketxs \\
    --dataset_name Harvard/gigaword                  # Panahi, Table 1's setting on a T5 (see the preset)
python recipes/summarization.py --train_file train.jsonl --validation_file dev.jsonl \\
    --source_column document --target_column subject
```

Data: ``--dataset_name`` (columns ``document``/``summary`` unless ``--source_column``/``--target_column``) or local
.jsonl/.csv files. Metric: ROUGE-1/2/L F1 (rouge-score, Porter stemmer) on the test split, else validation.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from recipe_kit import builtin
from recipe_kit.arguments import IMAGE_ONLY, parse_arguments
from recipe_kit.errors import run_main
from recipe_kit.loop import make_accelerator, train
from recipe_kit.metrics import rouge
from recipe_kit.seq2seq import SMALL_T5, seq2seq_task


DEFAULTS = dict(
    output_dir="outputs/summarization",
    compression="small_word2ketxs",
    learning_rate=3e-3,
    warmup_steps=100,
    max_steps=200,
    per_device_train_batch_size=32,
    max_source_length=96,
    max_target_length=24,
    checkpointing_steps=100,
)


def main(argv: Sequence[str] | None = None) -> dict:
    arguments = parse_arguments(DEFAULTS, argv, unused=IMAGE_ONLY)
    accelerator = make_accelerator(arguments.train)
    task = seq2seq_task("summarization", arguments, builtin.summarization, ("document", "summary"), rouge, SMALL_T5)
    return train(task, arguments, accelerator)


if __name__ == "__main__":
    sys.exit(run_main(main))
