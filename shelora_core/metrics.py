"""Offline evaluation metrics with the Hugging Face ``evaluate`` interface.

``evaluate.load("accuracy")`` downloads the metric script from the Hugging Face Hub and
fails without network access. The classes here subclass :class:`evaluate.Metric`
directly, so instantiating them needs no download and they keep the usual
``compute`` / ``add`` / ``add_batch`` interface.

Metrics
-------
* :class:`Accuracy` -- fraction of exact label matches, used for the GLUE-style
  classification tasks in SHE-LoRA / FlexLoRA (Bai et al., "Federated Fine-tuning of
  Large Language Models under Heterogeneous Tasks and Client Resources", NeurIPS 2024).
* :class:`MacroF1` -- unweighted mean of per-class F1 (``sklearn.metrics.f1_score``
  with ``average="macro"``).
* :class:`Rouge` -- ROUGE-1/2/L F-measures (Lin, 2004) from the ``rouge_score`` package,
  as used for the generation tasks (e.g. Natural Instructions) in FlexLoRA.

Offline behaviour of ``evaluate`` 0.4.6
---------------------------------------
* By default an ``EvaluationModule`` writes the predictions/references it is given to an
  Arrow cache file under ``~/.cache/huggingface/metrics`` and takes file locks on it.
  These classes default to ``keep_in_memory=True``, which uses an in-memory Arrow buffer
  instead (single process only; pass ``keep_in_memory=False`` for the distributed mode).
* Even with ``keep_in_memory=True``, ``EvaluationModule.__init__`` calls
  ``os.makedirs`` on ``<cache_dir>/<metric name>/default``. The base class here skips
  that directory creation when ``keep_in_memory=True`` so instantiation writes nothing
  to disk (the directory is never used in that mode).
* No network call is made when a subclass is instantiated directly; the tests run with
  ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import datasets
import evaluate
import numpy as np
from rouge_score import rouge_scorer
from sklearn.metrics import f1_score

__all__ = [
    "Accuracy",
    "MacroF1",
    "Rouge",
    "accuracy_score",
    "classification_metrics",
    "macro_f1_score",
    "rouge_scores",
]

_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

_CLASSIFICATION_INPUTS = """
Args:
    predictions (`list` of `int`): Predicted class labels.
    references (`list` of `int`): Ground-truth class labels, same length as predictions.
"""

_ROUGE_INPUTS = """
Args:
    predictions (`list` of `str`): Generated texts.
    references (`list` of `str`): One reference text per prediction.
Returns:
    rouge1, rouge2, rougeL: F-measures averaged over examples (plain mean, no bootstrap).
"""

_FLEXLORA_CITATION = """\
@inproceedings{bai2024flexlora,
  title={Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
         Client Resources},
  author={Bai, Jiamu and Chen, Daoyuan and Qian, Bingchen and Yao, Liuyi and Li, Yaliang},
  booktitle={Advances in Neural Information Processing Systems},
  year={2024}
}
"""

_SKLEARN_CITATION = """\
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

_ROUGE_CITATION = """\
@inproceedings{lin-2004-rouge,
  title={{ROUGE}: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew},
  booktitle={Text Summarization Branches Out},
  pages={74--81},
  year={2004}
}
"""


# --------------------------------------------------------------------------- pure functions


def _label_arrays(
    predictions: Sequence[int] | np.ndarray, references: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert label sequences to equal-length 1-D integer arrays."""
    preds = np.asarray(predictions)
    refs = np.asarray(references)
    if preds.ndim != 1 or refs.ndim != 1:
        raise ValueError(
            f"predictions and references must be 1-D label sequences, got shapes "
            f"{preds.shape} and {refs.shape}; take argmax over logits first."
        )
    if preds.shape != refs.shape:
        raise ValueError(
            f"predictions has shape {preds.shape} but references has shape {refs.shape}; "
            "pass one prediction per reference."
        )
    if preds.size == 0:
        raise ValueError("predictions and references are empty; nothing to score.")
    return preds, refs


def accuracy_score(
    predictions: Sequence[int] | np.ndarray, references: Sequence[int] | np.ndarray
) -> float:
    """Fraction of predictions equal to their reference.

    Parameters
    ----------
    predictions, references : sequence of int
        Equal-length, non-empty label sequences.

    Returns
    -------
    float
        Accuracy in ``[0, 1]``.
    """
    preds, refs = _label_arrays(predictions, references)
    return float(np.mean(preds == refs))


def macro_f1_score(
    predictions: Sequence[int] | np.ndarray, references: Sequence[int] | np.ndarray
) -> float:
    """Unweighted mean of per-class F1 over all labels seen in either sequence.

    A class that appears only in ``predictions`` contributes an F1 of 0
    (``zero_division=0``), matching ``sklearn.metrics.f1_score(average="macro")``.

    Parameters
    ----------
    predictions, references : sequence of int
        Equal-length, non-empty label sequences.

    Returns
    -------
    float
        Macro-averaged F1 in ``[0, 1]``.
    """
    preds, refs = _label_arrays(predictions, references)
    return float(f1_score(refs, preds, average="macro", zero_division=0))


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures from ``rouge_score`` (no stemming).

    ``rouge_score``'s default tokenizer lower-cases and keeps only ``[a-z0-9]`` runs, so
    text in non-Latin scripts scores 0; this matches ``evaluate``'s hub ``rouge`` metric.

    Parameters
    ----------
    predictions, references : sequence of str
        Equal-length, non-empty lists of generated and reference texts.

    Returns
    -------
    dict of str to float
        Keys ``"rouge1"``, ``"rouge2"``, ``"rougeL"``: F-measures averaged over examples.
    """
    preds = list(predictions)
    refs = list(references)
    if len(preds) != len(refs):
        raise ValueError(
            f"got {len(preds)} predictions and {len(refs)} references; "
            "pass one reference per prediction."
        )
    if not preds:
        raise ValueError("predictions and references are empty; nothing to score.")
    scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=False)
    totals = dict.fromkeys(_ROUGE_TYPES, 0.0)
    for pred, ref in zip(preds, refs, strict=True):
        scores = scorer.score(target=ref, prediction=pred)
        for key in _ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: float(totals[key] / len(preds)) for key in _ROUGE_TYPES}


def classification_metrics(
    predictions: Sequence[int] | np.ndarray, references: Sequence[int] | np.ndarray
) -> dict[str, float]:
    """Accuracy and macro F1 as Python floats, without going through ``evaluate``.

    Parameters
    ----------
    predictions, references : sequence of int
        Equal-length, non-empty label sequences.

    Returns
    -------
    dict of str to float
        ``{"accuracy": ..., "macro_f1": ...}``.
    """
    return {
        "accuracy": accuracy_score(predictions, references),
        "macro_f1": macro_f1_score(predictions, references),
    }


# --------------------------------------------------------------------------- evaluate wrappers


class _OfflineMetric(evaluate.Metric):
    """``evaluate.Metric`` that defaults to in-memory storage and creates no directories."""

    def __init__(self, *args: Any, keep_in_memory: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, keep_in_memory=keep_in_memory, **kwargs)

    def _build_data_dir(self) -> str:
        # evaluate 0.4.6 always creates <cache_dir>/<name>/<config>; the directory is only
        # used for on-disk Arrow caches, so skip creating it in keep_in_memory mode.
        if self.keep_in_memory:
            return os.path.join(self._data_dir_root, self.name, self.config_name)
        return super()._build_data_dir()

    def compute(
        self, *, predictions: Any = None, references: Any = None, **kwargs: Any
    ) -> dict[str, float] | None:
        """Compute the metric over everything added so far plus the given batch.

        Same as :meth:`evaluate.EvaluationModule.compute`, except that calling it with no
        inputs and nothing added raises a clear ``ValueError`` (evaluate 0.4.6 raises an
        ``AttributeError`` from its Arrow writer in that case).
        """
        if predictions is None and references is None and self.writer is None:
            raise ValueError(
                f"{type(self).__name__}.compute() called with no inputs and nothing added; "
                "pass predictions= and references= or call add_batch(...) first."
            )
        return super().compute(predictions=predictions, references=references, **kwargs)


def _metric_info(description: str, citation: str, inputs: str, dtype: str) -> evaluate.MetricInfo:
    """A metric's info: predictions and references of one ``datasets`` value type."""
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs,
        features=datasets.Features(
            {"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}
        ),
    )


class Accuracy(_OfflineMetric):
    """Accuracy as an offline ``evaluate.Metric``: ``compute(...) -> {"accuracy": float}``."""

    def _info(self) -> evaluate.MetricInfo:
        """Describe the metric and its ``int64`` label features."""
        return _metric_info(
            "Accuracy: the fraction of predicted labels equal to the reference.",
            _FLEXLORA_CITATION,
            _CLASSIFICATION_INPUTS,
            "int64",
        )

    def _compute(self, predictions: Sequence[int], references: Sequence[int]) -> dict[str, float]:
        """Return ``{"accuracy": float}``."""
        return {"accuracy": accuracy_score(predictions, references)}


class MacroF1(_OfflineMetric):
    """Macro F1 as an offline ``evaluate.Metric``: ``compute(...) -> {"macro_f1": float}``."""

    def _info(self) -> evaluate.MetricInfo:
        """Describe the metric and its ``int64`` label features."""
        return _metric_info(
            (
                "Macro F1: unweighted mean over classes of the per-class F1 score; classes "
                "seen only in predictions count with F1 = 0."
            ),
            _SKLEARN_CITATION,
            _CLASSIFICATION_INPUTS,
            "int64",
        )

    def _compute(self, predictions: Sequence[int], references: Sequence[int]) -> dict[str, float]:
        """Return ``{"macro_f1": float}``."""
        return {"macro_f1": macro_f1_score(predictions, references)}


class Rouge(_OfflineMetric):
    """ROUGE-1/2/L F-measures as an offline ``evaluate.Metric`` (plain mean over examples)."""

    def _info(self) -> evaluate.MetricInfo:
        """Describe the metric and its string features."""
        return _metric_info(
            (
                "ROUGE-1, ROUGE-2 and ROUGE-L F-measures from the rouge_score package "
                "(use_stemmer=False), averaged over examples without bootstrapping."
            ),
            _ROUGE_CITATION,
            _ROUGE_INPUTS,
            "string",
        )

    def _compute(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
        """Return ``{"rouge1": float, "rouge2": float, "rougeL": float}``."""
        return rouge_scores(predictions, references)
