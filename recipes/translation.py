"""Translation recipe: any ``AutoModelForSeq2SeqLM`` (T5 by default), compressed with ``--compression``, on Accelerate.

```bash
python recipes/translation.py                      # offline default: small T5 from a config, built-in corpus
python recipes/translation.py --compression t5_small_shapeshifter_iwslt14 \\
    --train_file iwslt14/train --validation_file iwslt14/valid --test_file iwslt14/test \\
    --source_lang de --target_lang en               # Panahi, Table 5 on fairseq-prepared IWSLT'14 De-En
accelerate launch recipes/translation.py ...        # several processes / GPUs, unchanged
```

Data: ``--dataset_name`` (a Hub data set with a ``translation`` column, e.g. ``wmt16 --dataset_config_name ro-en``),
or local ``--train_file``: .jsonl/.csv with source/target columns, or parallel text ``PREFIX.<lang>``. Metric:
sacreBLEU on the test split (validation when there is none), greedy or beam search (``--num_beams``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from recipe_kit import builtin
from recipe_kit.arguments import IMAGE_ONLY, parse_arguments
from recipe_kit.errors import run_main
from recipe_kit.loop import make_accelerator, train
from recipe_kit.metrics import bleu
from recipe_kit.seq2seq import SMALL_T5, seq2seq_task


DEFAULTS = dict(
    output_dir="outputs/translation",
    compression="small_shapeshifter",
    learning_rate=3e-3,
    warmup_steps=100,
    max_steps=250,
    per_device_train_batch_size=32,
    max_source_length=32,
    max_target_length=24,
    label_smoothing=0.1,
    checkpointing_steps=125,
)


def main(argv: Sequence[str] | None = None) -> dict:
    arguments = parse_arguments(DEFAULTS, argv, unused=IMAGE_ONLY)
    accelerator = make_accelerator(arguments.train)
    task = seq2seq_task("translation", arguments, builtin.translation, ("source", "target"), bleu, SMALL_T5)
    return train(task, arguments, accelerator)


if __name__ == "__main__":
    sys.exit(run_main(main))
