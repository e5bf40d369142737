"""Experiment configuration: one frozen dataclass, validated before any work starts.

Defaults live here; a profile or a notebook overrides a few fields with :meth:`FederatedConfig.replace`.
Every bad value fails in :meth:`FederatedConfig.validate` with a message naming the value, the
allowed range and what to change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .assets import MODELS
from .data import DATASETS as _DATASET_LOADERS
from .partitions import PARTITION_SCHEMES as PARTITIONS

__all__ = ["BUDGETED", "METHODS", "SHELORA_FAMILY", "FederatedConfig"]

#: aggregation methods the federation loop knows
METHODS = (
    "fedavg",
    "flexlora",
    "flexlora-dp",
    "shelora",
    "shelora+first-layers",
    "fedshield",
    "full_he",
    "maskcrypt",
)
#: methods that protect SHE-LoRA's ordered column list G (negotiated or public)
SHELORA_FAMILY = ("shelora", "shelora+first-layers")
#: methods whose encrypted share is set by ``he_budgets`` and ``cipher_mode``
BUDGETED = (*SHELORA_FAMILY, "maskcrypt")
CIPHER_MODES = ("delta", "paper")
LOSSES = ("ce", "logit_adjusted")
PROTECT_MODES = ("encrypt", "withhold")
COLUMN_ORDERS = ("negotiated", "w0_norm", "random")

#: the shipped models (:data:`shelora_core.assets.MODELS`) and datasets
#: (:data:`shelora_core.data.DATASETS`): one registry each, read here so a config is checked before
#: anything is loaded
MODEL_NAMES = tuple(MODELS)
DATASETS = tuple(_DATASET_LOADERS)
#: ``(m, n)`` of every LoRA target module per model, from the model registry
LAYER_SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    k: dict(spec.module_shapes) for k, spec in MODELS.items()
}
_DEFAULT_TARGETS = {k: spec.default_targets for k, spec in MODELS.items()}

#: fields added after runs were first recorded, with their defaults: they enter
#: :meth:`FederatedConfig.fingerprint` only when set to another value, so the runs (names,
#: checkpoints, results) of every configuration that does not use them keep their identity
_LATE_FIELDS: dict[str, Any] = {
    "shelora_protect": "encrypt",
    "renegotiate_every": None,
    "loss": "ce",
    "head_lr_scale": 1.0,
    "dp_epsilon": 10.0,
    "dp_delta": 1e-5,
    "dp_clip": 1.0,
    "dp_noise_multiplier": None,
    "first_layers": (0, 1),
    "first_layers_encrypt": "dw",
}


@dataclass(frozen=True)
class FederatedConfig:
    """One federated LoRA fine-tuning run.

    Attributes:
        method: aggregation, one of :data:`METHODS`. Defaults to ``"flexlora"``. ``"maskcrypt"``
            is the MaskCrypt baseline (:mod:`shelora_core.methods.maskcrypt`): per-weight selective
            HE of the zero-padded LoRA factors, encrypting per client as many values as SHE-LoRA
            does at the same ``he_budgets`` and ``cipher_mode``.
        model: ``"minilm"`` (BERT encoder) or ``"smollm2"`` (LLaMA decoder).
        dataset: ``"rotten_tomatoes"`` (binary sentiment) or ``"bbc_news"`` (5 topics).
        num_clients: clients in the federation. Defaults to 10.
        client_fraction: fraction of clients sampled each round (at least one). Defaults to 1.0.
        ranks: LoRA ranks, assigned to clients cyclically (client i gets ``ranks[i % len]``);
            one value = homogeneous. Defaults to ``(8,)``.
        lora_alpha: LoRA alpha; client i's scaling is ``alpha / r_i``. Defaults to 16.
        target_modules: adapted modules; ``None`` = the model's default (``query`` / ``q_proj``).
        partition: ``"iid"`` or ``"dirichlet"`` (label skew). Defaults to ``"dirichlet"``.
        dirichlet_alpha: concentration of the label Dirichlet; smaller = more skew. Defaults 0.3.
        min_client_examples: every client gets at least this many examples. Defaults to 10.
        rounds: federated rounds. Defaults to 10.
        local_steps: optimizer steps per client per round. Defaults to 10.
        batch_size: local minibatch size. Defaults to 16.
        lr: peak AdamW learning rate, cosine-annealed over rounds to ``lr * lr_final_ratio``.
        lr_final_ratio: final learning rate as a fraction of ``lr``. Defaults to 0.1.
        weight_decay: AdamW weight decay. Defaults to 0.0.
        loss: local training loss: ``"ce"`` (cross-entropy, the papers') or
            ``"logit_adjusted"`` (cross-entropy on ``logits + log(local label prior)``, Menon et
            al. 2021 / FedLC: each client's label skew is absorbed by the offset instead of the
            shared head, so the head learns the balanced decision rule; prediction uses the plain
            logits). Defaults to ``"ce"``.
        head_lr_scale: the classification head's learning rate is ``lr`` times this (the adapter
            uses ``lr``). Defaults to 1.0.
        max_length: tokens per example (truncation). Defaults to 64.
        train_examples: use only this many (seeded) training examples; ``None`` = all.
        eval_examples: evaluate on this many (seeded) test examples; ``None`` = all.
        eval_every: evaluate every this many rounds (the last round always). Defaults to 1.
        seed: seeds partition, sampling, initialisation and batches. Defaults to 0.
        he_budgets: SHE-LoRA: encrypted columns per layer, assigned to clients cyclically like
            ``ranks``. Defaults to ``(2, 4, 8)``. MaskCrypt encrypts the same number of values.
        cipher_mode: SHE-LoRA: ``"delta"`` (clients encrypt their pre-weighted dW columns, the
            server only adds) or ``"paper"`` (clients encrypt A's columns, the server multiplies
            them by plaintext p_i s_i B_i). Defaults to ``"delta"``. MaskCrypt: ``"delta"``
            matches SHE-LoRA delta's count (k_i x m values per layer) and clients pre-weight
            (additions only); ``"paper"`` matches SHE-LoRA paper's count (k_i x r_i values per
            layer) and the server weights the ciphertexts (MaskCrypt's own protocol).
        ckks_params: a name in :data:`shelora_core.ckks.PARAM_SETS`, or ``None`` for the method's
            default (``add_only`` for SHE-LoRA and MaskCrypt delta, ``paper_mm`` for SHE-LoRA
            paper, ``fedshield`` for the others).
        column_order: SHE-LoRA's ordered column list G: ``"negotiated"`` (the paper: sensitivity
            scores on each client's data, OPE, server-side negotiation before round 1),
            ``"w0_norm"`` (columns of the frozen weight by decreasing norm: public, an ablation) or
            ``"random"`` (seeded, an ablation).
        calibration_examples: examples per client for SHE-LoRA's sensitivity scores and for
            MaskCrypt's gradient (128).
        negotiation_grid_step: SHE-LoRA negotiation: grid step of the (a, b) search (0.1).
        authors_weighting: SHE-LoRA: divide each encrypted column by its number of contributors
            as the authors' code does (a bug: B is already weighted); for comparison only.
        fedshield_weighted: FedShield-LLM / full HE: weighted mean by sample count (``True``) or
            the authors' unweighted mean.
        prune: FedShield-LLM: magnitude pruning with the paper's schedule (full HE: ``False``).
        shelora_protect: SHE-LoRA: what happens to each client's columns ``G[:k_i]``:
            ``"encrypt"`` (the paper) or ``"withhold"`` (an ablation: they are not sent at all,
            no CKKS; the server averages each column over the clients that did send it and
            leaves it zero where nobody did). Defaults to ``"encrypt"``.
        renegotiate_every: SHE-LoRA with ``column_order="negotiated"``: re-run sensitivity ->
            OPE -> negotiation on the current global adapter before rounds 1, 1+K, 1+2K, ...
            (K = this value); ``None`` negotiates once, before round 1. Defaults to ``None``.
        dp_epsilon: ``flexlora-dp``: epsilon of each client's per-round Gaussian release (used
            when ``dp_noise_multiplier`` is ``None``). Defaults to 10 (the authors' setting).
        dp_delta: ``flexlora-dp``: delta of that release. Defaults to 1e-5.
        dp_clip: ``flexlora-dp``: L2 bound of a client's round update (all LoRA factors and the
            head together). Defaults to 1.0.
        dp_noise_multiplier: ``flexlora-dp``: noise std per unit of ``dp_clip``; overrides
            ``dp_epsilon`` when set. Defaults to ``None``.
        first_layers: ``shelora+first-layers``: the transformer blocks whose LoRA update is sent
            only as ciphertexts. Defaults to ``(0, 1)`` (the two layers DAGER reads).
        first_layers_encrypt: ``shelora+first-layers``: ``"dw"`` (each client's weighted update
            of those layers; the server adds) or ``"factors"`` (B and A; for its cost only).
    """

    method: str = "flexlora"
    model: str = "minilm"
    dataset: str = "rotten_tomatoes"
    num_clients: int = 10
    client_fraction: float = 1.0
    ranks: tuple[int, ...] = (8,)
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] | None = None
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.3
    min_client_examples: int = 10
    rounds: int = 10
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    lr_final_ratio: float = 0.1
    weight_decay: float = 0.0
    loss: str = "ce"
    head_lr_scale: float = 1.0
    max_length: int = 64
    train_examples: int | None = None
    eval_examples: int | None = 512
    eval_every: int = 1
    seed: int = 0
    he_budgets: tuple[int, ...] = (2, 4, 8)
    cipher_mode: str = "delta"
    ckks_params: str | None = None
    column_order: str = "negotiated"
    calibration_examples: int = 128
    negotiation_grid_step: float = 0.1
    authors_weighting: bool = False
    fedshield_weighted: bool = True
    prune: bool = True
    shelora_protect: str = "encrypt"
    renegotiate_every: int | None = None
    dp_epsilon: float | None = 10.0
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    dp_noise_multiplier: float | None = None
    first_layers: tuple[int, ...] = (0, 1)
    first_layers_encrypt: str = "dw"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # accept lists from notebooks / JSON and store tuples, so configs hash and compare
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        object.__setattr__(self, "he_budgets", tuple(int(k) for k in self.he_budgets))
        object.__setattr__(self, "first_layers", tuple(int(i) for i in self.first_layers))
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        k = self.renegotiate_every
        if k is not None and not isinstance(k, bool) and float(k) == int(k):
            object.__setattr__(self, "renegotiate_every", int(k))

    # ------------------------------------------------------------------ derived values
    def client_rank(self, client_id: int) -> int:
        return self.ranks[client_id % len(self.ranks)]

    def client_budget(self, client_id: int) -> int:
        """SHE-LoRA: encrypted columns per layer for this client."""
        return self.he_budgets[client_id % len(self.he_budgets)]

    @property
    def max_budget(self) -> int:
        """SHE-LoRA: the largest HE budget of any client (the length of the column list G)."""
        return max(self.client_budget(i) for i in range(self.num_clients))

    def negotiation_round(self, round_: int) -> int:
        """SHE-LoRA: the round before which the column list G used in ``round_`` was negotiated
        (1, 1 + K, 1 + 2K, ... with K = ``renegotiate_every``; always 1 when it is ``None``)."""
        k = self.renegotiate_every
        return 1 if k is None else 1 + k * ((int(round_) - 1) // k)

    @property
    def client_ranks(self) -> tuple[int, ...]:
        return tuple(self.client_rank(i) for i in range(self.num_clients))

    @property
    def uses_columns(self) -> bool:
        """Whether the method protects SHE-LoRA's ordered column list G."""
        return self.method in SHELORA_FAMILY

    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.client_fraction * self.num_clients))

    def replace(self, **changes: Any) -> FederatedConfig:
        """A copy with ``changes`` applied (validated)."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["ranks"] = list(self.ranks)
        d["he_budgets"] = list(self.he_budgets)
        d["first_layers"] = list(self.first_layers)
        if self.target_modules is not None:
            d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FederatedConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def fingerprint(self) -> str:
        """Short hash of every field that changes results (names checkpoints).

        Fields in ``_LATE_FIELDS`` count only when they differ from their default, so adding a
        field never renames the runs that do not use it.
        """
        d = self.to_dict()
        for name, default in _LATE_FIELDS.items():
            if d[name] == (list(default) if isinstance(default, tuple) else default):
                del d[name]
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def variant(self) -> str:
        """Short label of the method and its protection choices, e.g. ``shelora-delta``,
        ``shelora-delta-random``, ``shelora-delta-withhold``, ``maskcrypt-delta``."""
        if self.method not in BUDGETED:
            return self.method
        parts = [self.method, self.cipher_mode]
        if self.method in SHELORA_FAMILY:
            if self.column_order != "negotiated":
                parts.append(self.column_order)
            if self.shelora_protect != "encrypt":
                parts.append(self.shelora_protect)
            if self.renegotiate_every is not None:
                parts.append(f"reneg{self.renegotiate_every}")
        return "-".join(parts)

    @property
    def run_name(self) -> str:
        ranks = "-".join(str(r) for r in self.ranks)
        part = "iid" if self.partition == "iid" else f"dir{self.dirichlet_alpha:g}"
        return f"{self.method}_{self.model}_{self.dataset}_r{ranks}_{part}_{self.fingerprint()}"

    # ------------------------------------------------------------------ validation
    def validate(self) -> FederatedConfig:
        """Raise ``ValueError`` naming the first bad value and its allowed range."""

        def bad(name: str, value: Any, allowed: str) -> None:
            raise ValueError(f"config.{name} = {value!r} is invalid: {allowed}")

        if self.method not in METHODS:
            bad("method", self.method, f"choose one of {list(METHODS)}")
        if self.model not in MODEL_NAMES:
            bad("model", self.model, f"choose one of {list(MODEL_NAMES)} (models ship in packages)")
        if self.dataset not in DATASETS:
            bad("dataset", self.dataset, f"choose one of {list(DATASETS)}")
        if self.partition not in PARTITIONS:
            bad("partition", self.partition, f"choose one of {list(PARTITIONS)}")
        if self.dirichlet_alpha <= 0:
            bad("dirichlet_alpha", self.dirichlet_alpha, "must be > 0 (0.3 is the paper's skew)")
        if self.num_clients < 1:
            bad("num_clients", self.num_clients, "must be >= 1")
        if not 0 < self.client_fraction <= 1:
            bad("client_fraction", self.client_fraction, "must be in (0, 1]")
        if not self.ranks:
            bad("ranks", self.ranks, "give at least one LoRA rank, e.g. (8,) or (8, 16, 32)")
        for r in self.ranks:
            if r < 1:
                bad("ranks", self.ranks, f"every rank must be >= 1 (got {r})")
        if self.cipher_mode not in CIPHER_MODES:
            bad("cipher_mode", self.cipher_mode, f"choose one of {list(CIPHER_MODES)}")
        if self.column_order not in COLUMN_ORDERS:
            bad("column_order", self.column_order, f"choose one of {list(COLUMN_ORDERS)}")
        if self.shelora_protect not in PROTECT_MODES:
            bad(
                "shelora_protect",
                self.shelora_protect,
                f"choose one of {list(PROTECT_MODES)} ('withhold' drops the selected columns "
                "instead of encrypting them: an ablation)",
            )
        if self.renegotiate_every is not None and (
            isinstance(self.renegotiate_every, bool) or int(self.renegotiate_every) < 1
        ):
            bad(
                "renegotiate_every",
                self.renegotiate_every,
                "must be an integer >= 1 (rounds between negotiations) or None (negotiate once, "
                "before round 1)",
            )
        if not self.he_budgets or min(self.he_budgets) < 0:
            bad("he_budgets", self.he_budgets, "give one or more budgets >= 0 (columns per layer)")
        if self.method in BUDGETED:
            self._check_budgets_fit(bad)
        if self.method == "shelora+first-layers":
            if self.first_layers_encrypt not in ("dw", "factors"):
                bad("first_layers_encrypt", self.first_layers_encrypt, "choose 'dw' or 'factors'")
            if not self.first_layers or min(self.first_layers) < 0:
                bad("first_layers", self.first_layers, "give one or more block indices >= 0")
            if self.cipher_mode != "delta":
                bad("cipher_mode", self.cipher_mode, "shelora+first-layers runs in 'delta' mode")
            if self.shelora_protect != "encrypt":
                bad(
                    "shelora_protect",
                    self.shelora_protect,
                    "shelora+first-layers encrypts the protected layers: use 'encrypt' (the withhold "
                    "ablation is a setting of method 'shelora')",
                )
        if self.method == "flexlora-dp":
            self._check_dp(bad)
        if self.lora_alpha <= 0:
            bad("lora_alpha", self.lora_alpha, "must be > 0")
        for name in ("rounds", "local_steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), "must be >= 1")
        if self.min_client_examples < 1:
            bad("min_client_examples", self.min_client_examples, "must be >= 1")
        if self.lr <= 0:
            bad("lr", self.lr, "must be > 0")
        if not 0 <= self.lr_final_ratio <= 1:
            bad("lr_final_ratio", self.lr_final_ratio, "must be in [0, 1]")
        if self.weight_decay < 0:
            bad("weight_decay", self.weight_decay, "must be >= 0")
        if self.loss not in LOSSES:
            bad("loss", self.loss, f"choose one of {list(LOSSES)}")
        if not self.head_lr_scale > 0:
            bad("head_lr_scale", self.head_lr_scale, "must be > 0 (1.0 = the adapter's lr)")
        if self.max_length < 2:
            bad("max_length", self.max_length, "must be >= 2 tokens")
        for name in ("train_examples", "eval_examples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(name, v, "must be >= 1 or None (all)")
        if (
            self.train_examples is not None
            and self.num_clients * self.min_client_examples > self.train_examples
        ):
            bad(
                "num_clients",
                self.num_clients,
                f"more clients than the data allows: {self.num_clients} clients x "
                f"{self.min_client_examples} examples > train_examples={self.train_examples}",
            )
        return self

    def _check_dp(self, bad: Any) -> None:
        """Local DP settings: a positive clip, and a noise multiplier or a valid (epsilon, delta)."""
        import math

        if not (math.isfinite(self.dp_clip) and self.dp_clip > 0):
            bad("dp_clip", self.dp_clip, "must be a finite number > 0 (the update's L2 bound)")
        sigma = self.dp_noise_multiplier
        if sigma is not None:
            if not (math.isfinite(sigma) and sigma >= 0):
                bad("dp_noise_multiplier", sigma, "must be a finite number >= 0 or None")
            return
        if self.dp_epsilon is None or not (math.isfinite(self.dp_epsilon) and self.dp_epsilon > 0):
            bad(
                "dp_epsilon",
                self.dp_epsilon,
                "must be > 0 (10 is the authors' setting), or set dp_noise_multiplier",
            )
        if not 0 < self.dp_delta < 1:
            bad("dp_delta", self.dp_delta, "must be in (0, 1) (the authors' setting is 1e-5)")

    def _check_budgets_fit(self, bad: Any) -> None:
        """Budgets against the model's layer shapes (:data:`LAYER_SHAPES`; unknown targets are
        left to the model loader). A SHE-LoRA budget counts columns of a layer, so it must not
        exceed the narrowest layer's width n. MaskCrypt encrypts, per client, as many values as
        SHE-LoRA would (k_i x m per layer in delta mode, k_i x r_i in paper mode), chosen among
        the entries of its zero-padded factors, r_max x (m + n) per layer: more cannot exist."""
        shapes = LAYER_SHAPES.get(self.model, {})
        targets = self.target_modules or _DEFAULT_TARGETS.get(self.model, ())
        known = [shapes[t] for t in targets if t in shapes]
        if not known:
            return
        width = min(n for _, n in known)
        if max(self.he_budgets) > width:
            bad(
                "he_budgets",
                self.he_budgets,
                f"a budget counts columns of a layer and the narrowest adapted layer of "
                f"{self.model} ({', '.join(targets)}) has {width}: lower every budget to "
                f"<= {width}",
            )
        if self.method != "maskcrypt":
            return
        r_max = max(self.client_ranks)
        room = sum(r_max * (m + n) for m, n in known)  # per transformer block
        for i in range(min(self.num_clients, len(self.ranks) * len(self.he_budgets))):
            k = self.client_budget(i)
            per_col = (
                sum(m for m, _ in known)
                if self.cipher_mode == "delta"
                else (self.client_rank(i) * len(known))
            )
            if k * per_col > room:
                bad(
                    "he_budgets",
                    self.he_budgets,
                    f"MaskCrypt client {i} would encrypt {k * per_col} values per transformer "
                    f"block (budget {k} x {per_col}, SHE-LoRA {self.cipher_mode} mode's count) "
                    f"but its zero-padded LoRA factors hold only {room} (r_max {r_max} x (m + n)): "
                    f"lower he_budgets to <= {room // per_col} or raise the ranks",
                )
