"""Tests for ``shelora_core.metrics`` (offline ``evaluate`` metrics)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import evaluate  # noqa: E402
import pytest  # noqa: E402

from shelora_core.metrics import (  # noqa: E402
    Accuracy,
    MacroF1,
    Rouge,
    classification_metrics,
)

# Hand-computed macro F1 case.
# refs  = [0, 0, 1, 1, 2, 2], preds = [0, 1, 1, 1, 2, 0]
# class 0: TP=1 FP=1 FN=1 -> P=1/2 R=1/2 F1=1/2
# class 1: TP=2 FP=1 FN=0 -> P=2/3 R=1   F1=4/5
# class 2: TP=1 FP=0 FN=1 -> P=1   R=1/2 F1=2/3
# macro = (1/2 + 4/5 + 2/3) / 3 = 59/90
F1_PREDS = [0, 1, 1, 1, 2, 0]
F1_REFS = [0, 0, 1, 1, 2, 2]
F1_EXPECTED = 59 / 90


def test_offline_environment_is_set_and_metrics_are_evaluate_metrics() -> None:
    # Prepare / Execute
    metrics = [Accuracy(), MacroF1(), Rouge()]

    # Assert
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert all(isinstance(metric, evaluate.Metric) for metric in metrics)
    assert [metric.name for metric in metrics] == ["accuracy", "macro_f1", "rouge"]
    assert all(metric.keep_in_memory for metric in metrics)


def test_instantiation_writes_no_cache_directory(tmp_path) -> None:
    # Prepare / Execute
    metric = Accuracy(cache_dir=str(tmp_path / "cache"))
    metric.compute(predictions=[1], references=[1])

    # Assert
    assert not (tmp_path / "cache").exists()


def test_accuracy_hand_computed() -> None:
    # Prepare
    metric = Accuracy()

    # Execute
    result = metric.compute(predictions=[0, 1, 1, 0, 2], references=[0, 1, 0, 0, 2])

    # Assert
    assert result == {"accuracy": pytest.approx(4 / 5, abs=1e-15)}
    assert isinstance(result["accuracy"], float)


def test_accuracy_add_batch_then_compute_accumulates_batches() -> None:
    # Prepare
    metric = Accuracy()

    # Execute
    metric.add_batch(predictions=[0, 1], references=[0, 1])
    metric.add_batch(predictions=[1, 1], references=[0, 1])
    metric.add(predictions=2, references=0)
    result = metric.compute()

    # Assert
    assert result["accuracy"] == pytest.approx(3 / 5, abs=1e-15)


def test_compute_without_inputs_raises_clear_error() -> None:
    # Prepare
    metric = Accuracy()

    # Execute / Assert
    with pytest.raises(ValueError, match="nothing added"):
        metric.compute()


def test_macro_f1_hand_computed() -> None:
    # Prepare
    metric = MacroF1()

    # Execute
    result = metric.compute(predictions=F1_PREDS, references=F1_REFS)

    # Assert
    assert result == {"macro_f1": pytest.approx(F1_EXPECTED, abs=1e-12)}


def test_macro_f1_add_batch_then_compute_equals_one_shot() -> None:
    # Prepare
    metric = MacroF1()

    # Execute
    metric.add_batch(predictions=F1_PREDS[:4], references=F1_REFS[:4])
    metric.add_batch(predictions=F1_PREDS[4:], references=F1_REFS[4:])
    result = metric.compute()

    # Assert
    assert result["macro_f1"] == pytest.approx(F1_EXPECTED, abs=1e-12)


def test_macro_f1_counts_class_only_predicted_as_zero() -> None:
    # Prepare: class 1 never occurs in the references -> F1 0; class 0: P=1 R=1/2 F1=2/3.
    preds, refs = [0, 1], [0, 0]

    # Execute
    result = MacroF1().compute(predictions=preds, references=refs)

    # Assert
    assert result["macro_f1"] == pytest.approx((2 / 3 + 0) / 2, abs=1e-12)


def test_classification_metrics_returns_python_floats() -> None:
    # Prepare / Execute
    result = classification_metrics(F1_PREDS, F1_REFS)

    # Assert
    assert result == {
        "accuracy": pytest.approx(4 / 6, abs=1e-15),
        "macro_f1": pytest.approx(F1_EXPECTED, abs=1e-12),
    }
    assert all(type(value) is float for value in result.values())


def test_classification_metrics_rejects_mismatched_lengths() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        classification_metrics([0, 1], [0, 1, 1])


def test_rouge_identical_strings_score_one() -> None:
    # Prepare
    text = ["the quick brown fox jumps over the lazy dog"]

    # Execute
    result = Rouge().compute(predictions=text, references=text)

    # Assert
    assert result == {
        "rouge1": pytest.approx(1.0),
        "rouge2": pytest.approx(1.0),
        "rougeL": pytest.approx(1.0),
    }


def test_rouge_disjoint_strings_score_zero() -> None:
    # Prepare / Execute
    result = Rouge().compute(predictions=["alpha beta gamma"], references=["delta epsilon"])

    # Assert
    assert result == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge1_partial_overlap_hand_computed() -> None:
    # Prepare: prediction tokens {the, cat, sat}; reference {the, cat, lay, on, the, mat}.
    # Clipped unigram overlap = 2 -> P = 2/3, R = 2/6, F = 2PR / (P + R) = 4/9.
    # Bigram overlap {"the cat"} = 1 -> P = 1/2, R = 1/5, F = 2/7.
    prediction, reference = "The cat sat.", "the cat lay on the mat"

    # Execute
    result = Rouge().compute(predictions=[prediction], references=[reference])

    # Assert
    assert result["rouge1"] == pytest.approx(4 / 9, abs=1e-12)
    assert result["rouge2"] == pytest.approx(2 / 7, abs=1e-12)
    assert result["rougeL"] == pytest.approx(4 / 9, abs=1e-12)


def test_rouge_add_batch_averages_over_examples() -> None:
    # Prepare
    metric = Rouge()

    # Execute
    metric.add_batch(predictions=["same words here"], references=["same words here"])
    metric.add_batch(predictions=["alpha"], references=["omega"])
    result = metric.compute()

    # Assert
    assert result["rouge1"] == pytest.approx(0.5)
    assert result["rougeL"] == pytest.approx(0.5)
