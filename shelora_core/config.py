"""Experiment configuration: one frozen dataclass, checked when it is built.

Defaults live here; a profile or a notebook overrides a few fields with :meth:`FederatedConfig.replace`.
Every field is typed and range-checked when the config is constructed: a bad value raises
:class:`~shelora_core.errors.ConfigError` (a ``ValueError``) whose message names the field, the
value, the allowed range and what to change, before any data, model or key is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from .assets import MODELS
from .data import DATASETS as _DATASET_LOADERS
from .errors import ConfigError
from .partitions import PARTITION_SCHEMES as PARTITIONS

__all__ = [
    "BUDGETED",
    "METHODS",
    "MIN_COLUMN_COVERAGE",
    "SHELORA_FAMILY",
    "FederatedConfig",
    "learning_rate",
]

#: aggregation methods the federation loop knows
METHODS = (
    "fedavg",
    "flexlora",
    "flexlora-dp",
    "shelora",
    "shelora+first-layers",
    "shelora-dp",
    "fedshield",
    "full_he",
    "maskcrypt",
)
#: methods that protect SHE-LoRA's ordered column list G (negotiated or public)
SHELORA_FAMILY = ("shelora", "shelora+first-layers", "shelora-dp")
#: methods whose encrypted share is set by ``he_budgets`` and ``cipher_mode``
BUDGETED = (*SHELORA_FAMILY, "maskcrypt")
CIPHER_MODES = ("delta", "paper", "packed")
LOSSES = ("ce", "logit_adjusted")
PROTECT_MODES = ("encrypt", "withhold")
COLUMN_ORDERS = ("negotiated", "w0_norm", "random")
FIRST_LAYERS_ENCRYPT = ("dw", "factors")

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

#: the default of ``min_column_coverage``: the share of a client's own top-k_i columns (pooled
#: over layers) the negotiated prefix G[:k_i] must cover before the client uses it
#: (:func:`shelora_core.methods.shelora_negotiation.check_coverage`)
MIN_COLUMN_COVERAGE = 0.5

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
    "dp_target_epsilon": None,
    "first_layers": (0, 1),
    "first_layers_encrypt": "dw",
    "min_clients": 1,
    "seeded_uploads": False,
    "prune_schedule_rounds": None,
    "secret_init": False,
    "min_column_coverage": MIN_COLUMN_COVERAGE,
}

#: torch.manual_seed takes seeds below 2**64 (numpy's generators take any non-negative integer)
_SEED_LIMIT = 2**64


@dataclass(frozen=True)
class FederatedConfig:
    """One federated LoRA fine-tuning run.

    Attributes:
        method: aggregation, one of :data:`METHODS`. Defaults to ``"flexlora"``. ``"maskcrypt"``
            is the MaskCrypt baseline (:mod:`shelora_core.methods.maskcrypt`): per-weight selective
            HE of the zero-padded LoRA factors, encrypting per client as many values as SHE-LoRA
            does at the same ``he_budgets`` and ``cipher_mode``. ``"shelora-dp"`` is SHE-LoRA
            (delta mode) with local DP on its plaintext part (:mod:`shelora_core.methods.shelora_dp`).
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
            server only adds), ``"paper"`` (clients encrypt A's columns, one ciphertext each, the
            server multiplies them by plaintext p_i s_i B_i) or ``"packed"`` (the paper's
            protocol with A's columns densely packed and packed products; SHE-LoRA only).
            Defaults to ``"delta"``. MaskCrypt: ``"delta"``
            matches SHE-LoRA delta's count (k_i x m values per layer) and clients pre-weight
            (additions only); ``"paper"`` matches SHE-LoRA paper's count (k_i x r_i values per
            layer) and the server weights the ciphertexts (MaskCrypt's own protocol).
        ckks_params: a name in :data:`shelora_core.ckks.PARAM_SETS`, or ``None`` for the method's
            default (``add_only`` for SHE-LoRA and MaskCrypt delta, ``paper_mm`` for SHE-LoRA
            paper, ``packed`` for SHE-LoRA packed, ``fedshield`` for the others).
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
        prune_schedule_rounds: FedShield-LLM with ``prune``: ``None`` keeps the paper's schedule
            (nothing pruned before round 40, 0.2 at round 40 rising to 0.5 at round 200), which a
            run of fewer than 40 rounds never reaches; an integer R lays those 200 rounds over R:
            round t prunes as the paper's round t x 200 / R (R = ``rounds``: the ramp begins at
            0.2R and reaches 0.5 in the last round; :mod:`shelora_core.pruning`). Other methods
            ignore it. Defaults to ``None``.
        shelora_protect: SHE-LoRA: what happens to each client's columns ``G[:k_i]``:
            ``"encrypt"`` (the paper) or ``"withhold"`` (an ablation: they are not sent at all,
            no CKKS; the server averages each column over the clients that did send it and
            leaves it zero where nobody did). Defaults to ``"encrypt"``.
        renegotiate_every: SHE-LoRA with ``column_order="negotiated"``: re-run sensitivity ->
            OPE -> negotiation on the current global adapter before rounds 1, 1+K, 1+2K, ...
            (K = this value); ``None`` negotiates once, before round 1. Defaults to ``None``.
        dp_epsilon: DP methods (``flexlora-dp``, ``shelora-dp``): epsilon of each client's
            per-round Gaussian release (used when ``dp_noise_multiplier`` and
            ``dp_target_epsilon`` are ``None``). Defaults to 10 (the authors' setting).
        dp_delta: ``flexlora-dp``: delta of that release. Defaults to 1e-5.
        dp_clip: ``flexlora-dp``: L2 bound of a client's round update (all LoRA factors and the
            head together; ``shelora-dp``: its plaintext part). Defaults to 1.0.
        dp_noise_multiplier: ``flexlora-dp``: noise std per unit of ``dp_clip``; overrides
            ``dp_epsilon`` and ``dp_target_epsilon`` when set. Defaults to ``None``.
        dp_target_epsilon: DP methods: the epsilon the whole run may spend (at ``dp_delta``,
            client-level, against the server: :mod:`shelora_core.accounting`); the clients'
            noise multiplier is calibrated to it by the RDP accountant over ``rounds`` instead
            of per round from ``dp_epsilon``. Exclusive with ``dp_noise_multiplier``. Defaults
            to ``None`` (per-round calibration).
        first_layers: ``shelora+first-layers``: the transformer blocks whose LoRA update is sent
            only as ciphertexts. Defaults to ``(0, 1)`` (the two layers DAGER reads).
        first_layers_encrypt: ``shelora+first-layers``: ``"dw"`` (each client's weighted update
            of those layers; the server adds) or ``"factors"`` (B and A; for its cost only).
        min_clients: the fewest valid uploads a round may be aggregated from (for the server: when
            it rejects bad uploads, it aggregates the rest only if at least this many remain).
            ``1 <= min_clients <= clients_per_round``. Defaults to 1.
        seeded_uploads: encrypted methods: clients encrypt their uploads with the secret key
            and send the seed of each ciphertext's random half instead of the half
            (:mod:`shelora_core.ckks.seeded`): about half the upload bytes per ciphertext, the
            same values up to CKKS noise; the server's results (broadcasts) keep their size.
            Methods that send no ciphertext ignore it. Defaults to ``False`` (TenSEAL's bytes).
        secret_init: the round-1 adapter's A is derived from a key the clients share (written
            with their keys by the key holder, :class:`~shelora_core.checkpoint.RunDirs`), not
            from ``seed``: the server, which holds the public model and ``seed``, does not know
            A before the first uploads (:func:`shelora_core.client.secret_init_seed`). The head
            and ``B = 0`` stay as before. Defaults to ``False`` (A from ``seed``: public).
        min_column_coverage: SHE-LoRA with ``column_order="negotiated"``: each client refuses a
            negotiated list whose prefix ``G[:k_i]`` covers less than this share of its own
            top-k_i columns, pooled over the layers (a server steering the negotiation;
            :func:`~shelora_core.methods.shelora_negotiation.check_coverage`). In [0, 1]; 0
            accepts any list. Defaults to :data:`MIN_COLUMN_COVERAGE` (0.5).
        extra: free-form notes (not compared, not hashed, not saved by :meth:`to_dict`).

    How fields are checked: every field is typed and range-checked when the config is built
    (``__post_init__``, so also by :meth:`replace` and :meth:`from_dict`); :meth:`validate`
    re-runs the same checks and returns the config. A bad value raises
    :class:`~shelora_core.errors.ConfigError` (a ``ValueError``) reading
    ``config.<field> = <value> is invalid: <allowed range and the fix>``. The rules:

    * integer fields take ints; numpy integers and integral floats (``2.0``) are converted, ``2.5``,
      NaN, Inf, strings and bools are refused; ``seed`` is in ``[0, 2**64)`` (torch's range);
    * number fields take finite ints or floats (numpy scalars are converted to Python numbers;
      NaN and Inf are refused); booleans take ``True`` / ``False`` only;
    * choice fields (``method``, ``model``, ``partition``, ...) take one of their listed strings;
    * ``ranks``, ``he_budgets``, ``first_layers`` and ``target_modules`` take a list or tuple (or
      a 1-D numpy array), stored as a tuple; a scalar or a string is refused, and so is an
      element that is not an integral number (``target_modules``: not a module name of
      ``model``; ``first_layers``: not a block index of ``model``, or repeated);
    * cross-field rules: budgets that fit the model's layers, more training examples than
      ``num_clients x min_client_examples``, ``min_clients <= clients_per_round``, the
      ``shelora+first-layers`` and ``flexlora-dp`` settings, and a ``ckks_params`` set that
      passes :func:`~shelora_core.ckks.check_security` and that the method can run with
      (SHE-LoRA paper mode, FedShield-LLM, full HE and MaskCrypt paper multiply ciphertexts by
      plaintexts and need a set with multiplicative depth >= 1; SHE-LoRA paper mode also needs
      Galois keys). Methods that send no ciphertext ignore ``ckks_params``.

    The constructor, :meth:`replace` and :meth:`from_dict` refuse unknown field names with a
    :class:`~shelora_core.errors.ConfigError` suggesting close ones.
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
    dp_target_epsilon: float | None = None
    first_layers: tuple[int, ...] = (0, 1)
    first_layers_encrypt: str = "dw"
    min_clients: int = 1
    seeded_uploads: bool = False
    prune_schedule_rounds: int | None = None
    secret_init: bool = False
    min_column_coverage: float = MIN_COLUMN_COVERAGE
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # type every field and store its canonical form (lists from notebooks / JSON become
        # tuples, numpy scalars and integral floats become Python ints / floats), so configs hash,
        # compare and fingerprint the same however they were written; then the range checks
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
        self.validate()

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
        """A copy with ``changes`` applied (checked like any new config).

        Raises:
            ConfigError: a name in ``changes`` is not a field (with close field names), or a
                value is invalid.
        """
        _refuse_unknown(changes, "replace()")
        return dataclasses.replace(self, **changes)

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
    def from_dict(cls, d: Mapping[str, Any]) -> FederatedConfig:
        """The config saved by :meth:`to_dict` (fields added later take their defaults).

        Raises:
            ConfigError: ``d`` is not a mapping, names an unknown field (with close field
                names), or holds an invalid value.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(
                f"FederatedConfig.from_dict needs a dict of field values (as written by "
                f"to_dict()), got {type(d).__name__}: {d!r:.80}"
            )
        _refuse_unknown(d, "from_dict()")
        return cls(**d)

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
        ``shelora-delta-random``, ``shelora-delta-withhold``, ``maskcrypt-delta``,
        ``shelora-delta-secretA`` (secret initial A); FedShield-LLM with its pruning schedule laid
        over R rounds: ``fedshield-prune<R>``."""
        if self.method == "fedshield" and self.prune and self.prune_schedule_rounds is not None:
            return f"fedshield-prune{self.prune_schedule_rounds}"
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
            if self.secret_init:
                parts.append("secretA")
        return "-".join(parts)

    @property
    def run_name(self) -> str:
        ranks = "-".join(str(r) for r in self.ranks)
        part = "iid" if self.partition == "iid" else f"dir{self.dirichlet_alpha:g}"
        return f"{self.method}_{self.model}_{self.dataset}_r{ranks}_{part}_{self.fingerprint()}"

    # ------------------------------------------------------------------ validation
    def validate(self) -> FederatedConfig:
        """Check every field and the rules between fields; return the config unchanged.

        Runs when the config is built; calling it again re-checks the stored values.

        Returns:
            ``self``.

        Raises:
            ConfigError: (a ``ValueError``) naming the first bad field, its value, the allowed
                range and the fix.
        """
        for f in dataclasses.fields(self):
            _coerce(f.name, getattr(self, f.name))  # types and per-field ranges
        self._check_targets()
        blocks = MODELS[self.model].layers
        if max(self.first_layers) >= blocks:
            _bad(
                "first_layers",
                self.first_layers,
                f"{self.model} has {blocks} transformer blocks: give indices in 0..{blocks - 1}",
            )
        if self.method in BUDGETED:
            self._check_budgets_fit(_bad)
        if self.cipher_mode == "packed" and self.method == "maskcrypt":
            _bad(
                "cipher_mode",
                self.cipher_mode,
                "'packed' is SHE-LoRA's densely packed paper mode; MaskCrypt runs in 'delta' or "
                "'paper' mode",
            )
        if self.method == "shelora+first-layers":
            if self.cipher_mode != "delta":
                _bad("cipher_mode", self.cipher_mode, "shelora+first-layers runs in 'delta' mode")
            if self.shelora_protect != "encrypt":
                _bad(
                    "shelora_protect",
                    self.shelora_protect,
                    "shelora+first-layers encrypts the protected layers: use 'encrypt' (the withhold "
                    "ablation is a setting of method 'shelora')",
                )
        if self.method == "shelora-dp":
            if self.cipher_mode != "delta":
                _bad(
                    "cipher_mode",
                    self.cipher_mode,
                    "shelora-dp runs in 'delta' mode (paper mode would multiply the encrypted "
                    "columns by the noised plaintext B)",
                )
            if self.shelora_protect != "encrypt":
                _bad(
                    "shelora_protect",
                    self.shelora_protect,
                    "shelora-dp encrypts the protected columns: use 'encrypt' (the withhold "
                    "ablation is a setting of method 'shelora')",
                )
        if (
            self.method in ("flexlora-dp", "shelora-dp")
            and self.dp_noise_multiplier is None
            and self.dp_target_epsilon is None
            and self.dp_epsilon is None
        ):
            _bad(
                "dp_epsilon",
                self.dp_epsilon,
                "must be > 0 (10 is the authors' setting), or set dp_noise_multiplier or "
                "dp_target_epsilon",
            )
        if self.dp_target_epsilon is not None and self.dp_noise_multiplier is not None:
            _bad(
                "dp_target_epsilon",
                self.dp_target_epsilon,
                f"it calibrates the noise multiplier, which dp_noise_multiplier = "
                f"{self.dp_noise_multiplier!r} already fixes: set one of the two to None",
            )
        if (
            self.train_examples is not None
            and self.num_clients * self.min_client_examples > self.train_examples
        ):
            _bad(
                "num_clients",
                self.num_clients,
                f"more clients than the data allows: {self.num_clients} clients x "
                f"{self.min_client_examples} examples > train_examples={self.train_examples}",
            )
        if self.min_clients > self.clients_per_round:
            _bad(
                "min_clients",
                self.min_clients,
                f"a round samples only clients_per_round = max(1, round(client_fraction x "
                f"num_clients)) = {self.clients_per_round} clients (client_fraction="
                f"{self.client_fraction}, num_clients={self.num_clients}): lower min_clients to "
                f"<= {self.clients_per_round} or sample more clients",
            )
        self._check_ckks()
        return self

    def _check_targets(self) -> None:
        """``target_modules`` against the model's modules (the ones the LoRA loader accepts)."""
        if self.target_modules is None:
            return
        known = tuple(MODELS[self.model].module_shapes)
        for i, t in enumerate(self.target_modules):
            if t not in known:
                _bad(
                    "target_modules",
                    self.target_modules,
                    f"element {i} ({t!r}) is not a LoRA target module of {self.model}: choose "
                    f"from {list(known)}, or None for the default {list(_DEFAULT_TARGETS[self.model])}",
                )

    def _ckks_operations(self) -> str | None:
        """What the method's server does with ciphertexts: ``None`` (it sends none), ``"add"``,
        ``"multiply"`` (ciphertext x plaintext scalar: ``ServerCrypto.weighted_sum``) or
        ``"matmul"`` (ciphertext x plaintext matrix, ``CKKSVector.mm``: rotations)."""
        if self.method in ("fedavg", "flexlora", "flexlora-dp"):
            return None
        if self.method == "shelora":
            if self.shelora_protect == "withhold":
                return None
            return "matmul" if self.cipher_mode in ("paper", "packed") else "add"
        if self.method == "maskcrypt":
            return "multiply" if self.cipher_mode == "paper" else "add"
        if self.method in ("fedshield", "full_he"):
            return "multiply"
        return "add"  # shelora+first-layers and shelora-dp (delta mode only)

    def _check_ckks(self) -> None:
        """``ckks_params``: a named set that passes the security check and can run the method.

        Importing :mod:`shelora_core.ckks` loads TenSEAL (the package's ``__init__`` imports its
        roles), so it happens only when a set is named."""
        name = self.ckks_params
        if name is None:
            return
        from .ckks import PARAM_SETS, CKKSError, check_security

        if name not in PARAM_SETS:
            _bad(
                "ckks_params",
                name,
                f"choose one of {sorted(PARAM_SETS)} (shelora_core.ckks.PARAM_SETS), or None for "
                "the method's default",
            )
        try:
            params = check_security(name)
        except CKKSError as exc:
            _bad("ckks_params", name, f"the parameter set fails the security check: {exc}")
        ops = self._ckks_operations()
        what = self.variant if self.method in BUDGETED else self.method
        if ops in ("multiply", "matmul") and params.depth < 1:
            _bad(
                "ckks_params",
                name,
                f"{what} multiplies ciphertexts by plaintext weights on the server, which needs a "
                f"modulus chain with multiplicative depth >= 1, and {name!r} "
                f"({list(params.coeff_mod_bit_sizes)}) has depth {params.depth} (additions only): "
                "use 'fedshield' or 'paper_mm', or None for the method's default",
            )
        if ops == "matmul" and not params.galois:
            _bad(
                "ckks_params",
                name,
                f"{what} multiplies each encrypted column of A by a plaintext matrix "
                f"(CKKSVector.mm, or the packed products), which rotates ciphertexts and needs "
                f"Galois keys, and {name!r} generates none: use 'paper_mm' (paper) or 'packed' "
                "(packed), or None for the method's default",
            )

    def _check_budgets_fit(self, bad: Any) -> None:
        """Budgets against the model's layer shapes (:data:`LAYER_SHAPES`; the targets
        were checked against the model before). A SHE-LoRA budget counts columns of a layer, so it must not
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


# ---------------------------------------------------------------------- field checks
def _bad(name: str, value: Any, allowed: str) -> NoReturn:
    shown = repr(value)
    if len(shown) > 120:
        shown = f"{shown[:100]}... ({len(shown)} characters)"
    raise ConfigError(f"config.{name} = {shown} is invalid: {allowed}")


def _kind(value: Any) -> str:
    """``"an int"``, ``"a str"``, ...: the type of ``value`` for a message."""
    name = type(value).__name__
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _integral(value: Any) -> int | None:
    """``value`` as an int when it is an integral number (not a bool), else ``None``."""
    if _is_bool(value):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        v = _finite_float(value)
        if v is not None and v.is_integer():
            return int(v)
    return None


def _finite_float(value: Any) -> float | None:
    """``float(value)`` when it is finite, else ``None`` (NaN, Inf, too large for a float)."""
    try:
        v = float(value)
    except (OverflowError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _int(
    name: str,
    value: Any,
    *,
    minimum: int,
    maximum: int | None = None,
    optional: bool = False,
    allowed: str | None = None,
) -> int | None:
    """An integer field: ints, numpy integers and integral floats, within [minimum, maximum)."""
    if optional and value is None:
        return None
    allowed = allowed or (
        f"must be an integer >= {minimum}"
        + (f" and < {maximum}" if maximum is not None else "")
        + (" or None" if optional else "")
    )
    v = _integral(value)
    if v is None:
        example = _DEFAULTS.get(name)
        example = example if isinstance(example, int) and not _is_bool(example) else minimum
        if _is_bool(value):
            fix = f"got a bool; give an int such as {example}"
        elif isinstance(value, numbers.Real) and _finite_float(value) is not None:
            fix = f"not a whole number; give e.g. {math.floor(value)} or {math.ceil(value)}"
        elif isinstance(value, numbers.Real):
            fix = f"NaN and Inf are refused; give an int such as {example}"
        else:
            fix = f"got {_kind(value)}; give an int such as {example}"
        _bad(name, value, f"{allowed} ({fix})")
    if v < minimum or (maximum is not None and v >= maximum):
        _bad(name, value, allowed)
    return v


def _real(
    name: str,
    value: Any,
    *,
    ok: Callable[[float], bool],
    allowed: str,
    optional: bool = False,
) -> float | int | None:
    """A number field: a finite int or float with ``ok(value)``. Python ints stay ints (a config
    written ``lora_alpha=16`` keeps its fingerprint); numpy scalars become Python numbers."""
    if optional and value is None:
        return None
    if _is_bool(value) or not isinstance(value, numbers.Real):
        kind = "a bool" if _is_bool(value) else _kind(value)
        _bad(name, value, f"{allowed} (got {kind}; give a number{' or None' if optional else ''})")
    finite = _finite_float(value)
    if finite is None:
        _bad(name, value, f"{allowed} (NaN and Inf are refused: give a finite number)")
    v: float | int = int(value) if isinstance(value, numbers.Integral) else finite
    if not ok(v):
        _bad(name, value, allowed)
    return v


def _bool(name: str, value: Any) -> bool:
    if not _is_bool(value):
        _bad(name, value, f"must be True or False, not {_kind(value)}")
    return bool(value)


def _choice(name: str, value: Any, choices: Any, note: str = "") -> str:
    options = list(choices)
    if not isinstance(value, str):
        _bad(name, value, f"must be a string, one of {options}, not {_kind(value)}")
    if value not in options:
        _bad(name, value, f"choose one of {options}{note}")
    return str(value)


def _sequence(name: str, value: Any, example: str, what: str) -> tuple[Any, ...]:
    """A tuple field given as a list, tuple or 1-D array; a scalar or a string is refused."""
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return tuple(value.tolist())
    if isinstance(value, (list, tuple, range)):
        return tuple(value)
    kind = "a string" if isinstance(value, str) else f"a single {type(value).__name__}"
    _bad(name, value, f"give a tuple such as {example} ({what}), not {kind}")


def _int_tuple(
    name: str,
    value: Any,
    *,
    minimum: int,
    example: str,
    what: str,
    empty: str | None = None,
    below: str | None = None,
) -> tuple[int, ...]:
    """A tuple-of-integers field: every element an integral number >= ``minimum``."""
    items = _sequence(name, value, example, what)
    if not items:
        _bad(name, value, empty or f"give at least one value, e.g. {example} ({what})")
    out = []
    for i, x in enumerate(items):
        v = _integral(x)
        if v is None:
            _bad(
                name,
                value,
                f"element {i} ({x!r}) is not an integer; give a tuple of integers >= {minimum} "
                f"such as {example} ({what})",
            )
        if v < minimum:
            _bad(
                name,
                value,
                below.format(x=x)
                if below
                else f"every element must be >= {minimum} (element {i} is {x!r}); {what}",
            )
        out.append(v)
    return tuple(out)


def _ranks(name: str, value: Any) -> tuple[int, ...]:
    return _int_tuple(
        name,
        value,
        minimum=1,
        example="(8, 16, 32)",
        what="one LoRA rank per client, assigned cyclically",
        empty="give at least one LoRA rank, e.g. (8,) or (8, 16, 32)",
        below="every rank must be >= 1 (got {x})",
    )


def _he_budgets(name: str, value: Any) -> tuple[int, ...]:
    return _int_tuple(
        name,
        value,
        minimum=0,
        example="(2, 4, 8)",
        what="encrypted columns per layer, one budget per client, assigned cyclically",
        empty="give one or more budgets >= 0 (columns per layer), e.g. (2, 4, 8)",
        below="give one or more budgets >= 0 (columns per layer); got {x}",
    )


def _first_layers(name: str, value: Any) -> tuple[int, ...]:
    what = "transformer block indices"
    out = _int_tuple(name, value, minimum=0, example="(0, 1)", what=what)
    if len(set(out)) != len(out):
        _bad(name, value, "list each block once, e.g. (0, 1)")
    return out


def _target_modules(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    what = "leaf names of the adapted modules, or None for the model's default"
    items = _sequence(name, value, "('query', 'value')", what)
    if not items:
        _bad(name, value, "give at least one module name, e.g. ('query', 'value'), or None")
    for i, t in enumerate(items):
        if not isinstance(t, str) or not t:
            _bad(
                name,
                value,
                f"element {i} ({t!r}) is not a module name; give a tuple of strings such as "
                f"('query', 'value') ({what})",
            )
    if len(set(items)) != len(items):
        _bad(name, value, "list each module once")
    return tuple(str(t) for t in items)


def _grid_step(name: str, value: Any) -> float | int:
    v = _real(
        name,
        value,
        ok=lambda x: 0 < x <= 1,
        allowed="must be in (0, 1] and divide 1, e.g. 0.1, 0.05 or 0.25",
    )
    if abs(round(1 / v) * v - 1) > 1e-6:
        _bad(name, value, "must divide 1 (the (a, b) grid steps from 0 to 1), e.g. 0.1, 0.05, 0.25")
    return v


def _extra(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        _bad(name, value, f"must be a dict of free-form notes, not {_kind(value)}")
    return value


def _ckks_params(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        _bad(
            name,
            value,
            f"must be the name of a CKKS parameter set (a string, e.g. 'fedshield') or None, "
            f"not {_kind(value)}",
        )
    return str(value)


def _positive(allowed: str) -> dict[str, Any]:
    return dict(ok=lambda x: x > 0, allowed=allowed)


#: one check per field: returns the canonical value or raises ConfigError naming the field
_FIELD_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "method": lambda n, v: _choice(n, v, METHODS),
    "model": lambda n, v: _choice(n, v, MODEL_NAMES, " (models ship in packages)"),
    "dataset": lambda n, v: _choice(n, v, DATASETS),
    "num_clients": lambda n, v: _int(n, v, minimum=1),
    "client_fraction": lambda n, v: _real(
        n, v, ok=lambda x: 0 < x <= 1, allowed="must be in (0, 1] (the share sampled each round)"
    ),
    "ranks": _ranks,
    "lora_alpha": lambda n, v: _real(n, v, **_positive("must be > 0")),
    "target_modules": _target_modules,
    "partition": lambda n, v: _choice(n, v, PARTITIONS),
    "dirichlet_alpha": lambda n, v: _real(
        n, v, **_positive("must be > 0 (0.3 is the paper's skew)")
    ),
    "min_client_examples": lambda n, v: _int(n, v, minimum=1),
    "rounds": lambda n, v: _int(n, v, minimum=1),
    "local_steps": lambda n, v: _int(n, v, minimum=1),
    "batch_size": lambda n, v: _int(n, v, minimum=1),
    "lr": lambda n, v: _real(n, v, **_positive("must be > 0 (the peak learning rate)")),
    "lr_final_ratio": lambda n, v: _real(
        n, v, ok=lambda x: 0 <= x <= 1, allowed="must be in [0, 1] (a fraction of lr)"
    ),
    "weight_decay": lambda n, v: _real(n, v, ok=lambda x: x >= 0, allowed="must be >= 0"),
    "loss": lambda n, v: _choice(n, v, LOSSES),
    "head_lr_scale": lambda n, v: _real(n, v, **_positive("must be > 0 (1.0 = the adapter's lr)")),
    "max_length": lambda n, v: _int(n, v, minimum=2, allowed="must be >= 2 tokens"),
    "train_examples": lambda n, v: _int(
        n, v, minimum=1, optional=True, allowed="must be >= 1 or None (all)"
    ),
    "eval_examples": lambda n, v: _int(
        n, v, minimum=1, optional=True, allowed="must be >= 1 or None (all)"
    ),
    "eval_every": lambda n, v: _int(n, v, minimum=1),
    "seed": lambda n, v: _int(
        n, v, minimum=0, maximum=_SEED_LIMIT, allowed="must be an integer >= 0 and < 2**64"
    ),
    "he_budgets": _he_budgets,
    "cipher_mode": lambda n, v: _choice(n, v, CIPHER_MODES),
    "ckks_params": _ckks_params,
    "column_order": lambda n, v: _choice(n, v, COLUMN_ORDERS),
    "calibration_examples": lambda n, v: _int(n, v, minimum=1),
    "negotiation_grid_step": _grid_step,
    "authors_weighting": _bool,
    "fedshield_weighted": _bool,
    "prune": _bool,
    "shelora_protect": lambda n, v: _choice(
        n,
        v,
        PROTECT_MODES,
        " ('withhold' drops the selected columns instead of encrypting them: an ablation)",
    ),
    "renegotiate_every": lambda n, v: _int(
        n,
        v,
        minimum=1,
        optional=True,
        allowed="must be an integer >= 1 (rounds between negotiations) or None (negotiate once, "
        "before round 1)",
    ),
    "dp_epsilon": lambda n, v: _real(
        n,
        v,
        optional=True,
        **_positive("must be > 0 (10 is the authors' setting), or None with dp_noise_multiplier"),
    ),
    "dp_delta": lambda n, v: _real(
        n, v, ok=lambda x: 0 < x < 1, allowed="must be in (0, 1) (the authors' setting is 1e-5)"
    ),
    "dp_clip": lambda n, v: _real(n, v, **_positive("must be > 0 (the update's L2 bound)")),
    "dp_noise_multiplier": lambda n, v: _real(
        n, v, optional=True, ok=lambda x: x >= 0, allowed="must be >= 0 or None"
    ),
    "dp_target_epsilon": lambda n, v: _real(
        n,
        v,
        optional=True,
        **_positive(
            "must be > 0 (the epsilon the whole run may spend, e.g. 8) or None (per-round "
            "calibration from dp_epsilon)"
        ),
    ),
    "first_layers": _first_layers,
    "first_layers_encrypt": lambda n, v: _choice(n, v, FIRST_LAYERS_ENCRYPT),
    "min_clients": lambda n, v: _int(
        n,
        v,
        minimum=1,
        allowed="must be an integer >= 1 (the fewest valid uploads a round is aggregated from)",
    ),
    "seeded_uploads": _bool,
    "prune_schedule_rounds": lambda n, v: _int(
        n,
        v,
        minimum=1,
        optional=True,
        allowed="must be an integer >= 1 (the rounds the paper's 200-round pruning schedule is "
        "laid over, e.g. the run's rounds) or None (the paper's schedule: no pruning before "
        "round 40)",
    ),
    "secret_init": _bool,
    "min_column_coverage": lambda n, v: _real(
        n,
        v,
        ok=lambda x: 0 <= x <= 1,
        allowed="must be in [0, 1] (the share of a client's own top-k_i columns the negotiated "
        "prefix must cover; 0 accepts any list)",
    ),
    "extra": _extra,
}


_DEFAULTS: dict[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(FederatedConfig)
    if f.default is not dataclasses.MISSING
}


def _coerce(name: str, value: Any) -> Any:
    """The canonical form of field ``name``'s ``value``, or :class:`ConfigError`."""
    return _FIELD_CHECKS[name](name, value)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(FederatedConfig))
if set(_FIELD_CHECKS) != set(_FIELD_NAMES):  # every field has its check
    raise ImportError(
        f"config fields without a check: {sorted(set(_FIELD_NAMES) - set(_FIELD_CHECKS))}; "
        f"checks without a field: {sorted(set(_FIELD_CHECKS) - set(_FIELD_NAMES))}"
    )


def _refuse_unknown(names: Any, where: str) -> None:
    """:class:`ConfigError` for names that are not fields, suggesting close field names."""
    unknown = [k for k in names if k not in _FIELD_NAMES]
    if not unknown:
        return
    parts = []
    for k in unknown:
        close = difflib.get_close_matches(str(k), _FIELD_NAMES, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        parts.append(f"{k!r}{hint}")
    raise ConfigError(
        f"unknown config field(s) in {where}: {', '.join(parts)}; FederatedConfig has no such "
        f"field. Known fields: {list(_FIELD_NAMES)}"
    )


def _wrap_init(init: Callable[..., None]) -> Callable[..., None]:
    """The dataclass ``__init__``, refusing unknown keyword names with a :class:`ConfigError`
    (close field names suggested) instead of a bare ``TypeError``."""

    @functools.wraps(init)
    def __init__(self: FederatedConfig, *args: Any, **kwargs: Any) -> None:
        _refuse_unknown(kwargs, "FederatedConfig()")
        init(self, *args, **kwargs)

    return __init__


FederatedConfig.__init__ = _wrap_init(FederatedConfig.__init__)  # type: ignore[method-assign]


def learning_rate(cfg: FederatedConfig, round_: int) -> float:
    """Cosine annealing over rounds, from ``lr`` (round 1) to ``lr * lr_final_ratio`` (last)."""
    if cfg.rounds == 1:
        return cfg.lr
    t = (round_ - 1) / (cfg.rounds - 1)
    lo = cfg.lr * cfg.lr_final_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * t))
