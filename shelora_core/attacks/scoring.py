"""How much of a batch DAGER recovered: token-set precision / recall and matched ROUGE.

The reconstructed sentences come back in no particular order; as in DAGER's evaluation (Petrov et
al., "DAGER: Exact Gradient Inversion for Large Language Models", NeurIPS 2024) they are matched
to the references before ROUGE is computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["match_sentences", "score_reconstruction", "token_set_scores"]


def token_set_scores(predicted: Sequence[int], true: Sequence[int]) -> tuple[float, float]:
    """Precision and recall of a recovered token set against the true one.

    Returns:
        ``(precision, recall)``; precision is 0 for an empty prediction, recall is 1 for an empty
        truth.
    """
    p, t = {int(v) for v in predicted}, {int(v) for v in true}
    precision = len(p & t) / len(p) if p else 0.0
    recall = len(p & t) / len(t) if t else 1.0
    return precision, recall


def match_sentences(predictions: Sequence[str], references: Sequence[str]) -> list[str]:
    """Pair reconstructions with references (optimal assignment on ROUGE-1 F), one per reference.

    A batch's sentences come back in no particular order; DAGER's evaluation matches them to the
    references before scoring. Missing reconstructions become empty strings.
    """
    from rouge_score import rouge_scorer
    from scipy.optimize import linear_sum_assignment

    refs = list(references)
    preds = list(predictions)
    out = [""] * len(refs)
    if not preds or not refs:
        return out
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    gain = np.array([[scorer.score(r, p)["rouge1"].fmeasure for p in preds] for r in refs])
    rows, cols = linear_sum_assignment(-gain)
    for r, c in zip(rows, cols, strict=True):
        out[r] = preds[c]
    return out


def score_reconstruction(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L of matched reconstructions (:func:`match_sentences`) via ``rouge_scores``."""
    from ..metrics import rouge_scores

    return rouge_scores(match_sentences(predictions, references), list(references))
