"""The recipes' metrics: BLEU (sacrebleu), ROUGE-1/2/L (rouge-score), top-1 accuracy.

ROUGE is computed with Google's ``rouge_score`` package, the one ``evaluate``'s ``rouge`` metric wraps (that
metric downloads its script at run time): F1 with the Porter stemmer, averaged over examples, times 100. It is
imported when ROUGE is computed, so the translation and image recipes run without it (``pip install
"kron_transformers[recipes]"`` brings it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sacrebleu


def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, one reference per sentence)."""
    return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (x100), Porter stemming."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    return {name: 100 * float(np.mean([score[name].fmeasure for score in scores])) for name in ROUGE_TYPES}


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Top-1 accuracy in percent."""
    return {"accuracy": 100 * float(np.mean(np.asarray(predictions) == np.asarray(labels)))}
