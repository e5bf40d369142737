"""Membership inference on the released global model (issue 15, item 3).

Every method of the package protects what a client *uploads*; what the federation *releases* is the
global model (the frozen base + the global adapter + the head, read at the largest rank, as
:meth:`~shelora_core.federation.Federation.evaluate` scores it and
:func:`~shelora_core.export.export_federation` writes it). SHE-LoRA, FedShield-LLM and full HE
aggregate ciphertexts, but the clients decrypt the aggregate and the model they release is the
same function of their data as plaintext FlexLoRA's / FedAvg's (up to CKKS noise): encrypting the
updates cannot change what the released model reveals about its training examples. Only noise in
the training itself (the DP methods) can. This module measures it.

**Members and non-members.** Members are the clients' training examples *actually used*: the
examples some local AdamW step drew, replayed from the seeds of
:func:`shelora_core.client.local_train` (:func:`trained_examples`); a client's examples that no
step drew are neither members nor non-members and are left out. Non-members are examples of the
same training split of the corpus that the run never selected (``train_examples`` picks a
seeded subset of it): the same distribution, never trained on, and never used for evaluation
either. The test split is used only when that pool is too small (``train_examples=None``);
the record says which (``nonmember_source``). Non-members are drawn with exactly the members'
label counts (Dirichlet clients and unequal use of clients' examples skew the members' label mix;
a mismatch would let an attack "infer membership" from the label alone), in equal number.

**Attacks** (scores: higher = "member"):

* *loss threshold* (Yeom et al., CSF 2018): ``score = -loss``, the released model's
  cross-entropy of the example's true label (plain logits: the attacker has the released model,
  not a client's label prior);
* *reference model* (calibrated loss, Watson et al., ICLR 2022; the offline, few-model end of
  LiRA, Carlini et al., S&P 2022): ``score = mean reference loss - target loss``. The attacker
  trains ``n_reference`` reference models by the public recipe (the setting's configuration, its
  public seed and initial adapter, method FlexLoRA: what the non-DP methods release) on as many
  examples as the target run, drawn from the population disjoint from the members and from the
  non-member targets, partitioned among the same number of clients in the same way. A hard
  example has a high loss under both models; a member's loss drops only under the target.

**Metrics** (:func:`attack_metrics`): ROC AUC (ties count one half) with a bootstrap 95% interval
(members and non-members resampled separately), TPR at 1% FPR (and 0.1% FPR when there are at
least 1000 non-members; below that it would be TPR at 0 FPR) read from the step ROC (no
interpolation), and the balanced accuracy at the best threshold (chosen on the same examples, so
optimistic). Everything in numpy.

**Matched utility.** At the documented per-round epsilon 10 the DP methods lose much of their
accuracy, so their lower AUC says little by itself: a model that learned less also remembers
less. The DP sweep (:func:`dp_sweep_methods`) trains each DP method again at whole-run target
epsilons :data:`DP_SWEEP_EPSILONS` (the RDP accountant calibrates the noise), and
:func:`matched_utility` picks, per setting and DP method, the point with the smallest accounted
whole-run epsilon whose accuracy is at least FlexLoRA's minus :data:`ACCURACY_TOLERANCE` (0.02)
and sets its AUC beside FlexLoRA's; when no point reaches the bar, the record says so. Every
point's (epsilon, delta), noise multiplier, accuracy, AUCs and TPR at 1% FPR are recorded.

**The runner** (:func:`run_membership`, ``python -m shelora_core.attacks.membership --profile
quick``) trains every method of :func:`membership_methods` and every point of the DP sweep with
the same data and seed in each setting of :func:`membership_settings` (reusing a finished run's
checkpoint), attacks each, checks that SHE-LoRA's (FedShield-LLM's) released model gives the
same losses and AUC as FlexLoRA's (FedAvg's) and that each sweep point spent the epsilon it was
calibrated to, and writes ``results/<profile>/membership.json``,
``results/<profile>/figures/membership_roc.png`` and ``membership_utility.png`` (AUC against
accuracy). Finished runs are kept in a JSONL under ``results/<profile>/checkpoints/membership/``
and skipped when the run is repeated.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import FederatedConfig
from ..errors import ConfigError

__all__ = [
    "ACCURACY_TOLERANCE",
    "DP_SWEEP_EPSILONS",
    "EPSILON_RTOL",
    "MEMBERSHIP_VERSION",
    "METHODS",
    "MembershipSplit",
    "Setting",
    "attack_metrics",
    "dp_sweep_methods",
    "drawn_positions",
    "equivalence_checks",
    "example_losses",
    "main",
    "matched_statement",
    "matched_utility",
    "membership_methods",
    "membership_settings",
    "membership_split",
    "released_weights",
    "roc_auc",
    "roc_curve",
    "roc_figure",
    "run_membership",
    "statement",
    "summary_table",
    "sweep_accounting_checks",
    "sweep_table",
    "tpr_at_fpr",
    "trained_examples",
    "utility_figure",
]

#: stamped on every row; a row from another version is recomputed, never reused
MEMBERSHIP_VERSION = 1

#: the methods attacked, as (label, overrides of the setting's configuration); the DP methods at
#: the package's documented per-round epsilon (``dp_epsilon``, default 10: the authors' setting)
METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("fedavg", dict(method="fedavg")),
    ("flexlora", dict(method="flexlora")),
    ("shelora-delta", dict(method="shelora", cipher_mode="delta")),
    ("fedshield", dict(method="fedshield")),
    ("flexlora-dp", dict(method="flexlora-dp")),
    ("shelora-dp", dict(method="shelora-dp", cipher_mode="delta")),
)

#: the DP methods' privacy sweep (:func:`dp_sweep_methods`): whole-run target epsilons
#: (``dp_target_epsilon`` at the setting's ``dp_delta``, client-level, against the server:
#: :mod:`shelora_core.accounting`), a geometric series of ratio 10. With the :data:`METHODS` row at
#: the documented per-round epsilon 10 (about 21 over the quick profile's 3 rounds) they span the
#: DP methods' accuracy from well below FlexLoRA's to FlexLoRA's in the quick settings (in a pilot
#: run SHE-LoRA-DP was still below FlexLoRA's accuracy at 1000 in the quick setting, so the series
#: goes one decade further). Ratio 10 keeps the quick sweep to 12 runs; a finer series is
#: ``--sweep-epsilons``
DP_SWEEP_EPSILONS: tuple[float, ...] = (100.0, 1000.0, 10000.0)
#: "matched utility" (:func:`matched_utility`): a DP point's accuracy is at least FlexLoRA's
#: minus this
ACCURACY_TOLERANCE = 0.02
#: accuracies are fractions of a test set: an accuracy equal to the bar must not fail by rounding
_ACC_EPS = 1e-9

#: pairs whose released models agree up to CKKS noise (encrypted aggregation, same arithmetic):
#: their per-example losses and AUCs must agree
EQUIVALENT = (("shelora-delta", "flexlora"), ("fedshield", "fedavg"))
#: the agreement :func:`equivalence_checks` requires: largest per-example loss difference, and
#: AUC difference
LOSS_TOLERANCE = 1e-3
AUC_TOLERANCE = 0.01


# ---------------------------------------------------------------------------- ROC (numpy)
def _scores(member_scores: Any, nonmember_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(member_scores, dtype=np.float64).reshape(-1)
    neg = np.asarray(nonmember_scores, dtype=np.float64).reshape(-1)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(
            f"need at least one member and one non-member score (got {pos.size} members, "
            f"{neg.size} non-members)"
        )
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError(
            "scores must be finite: a NaN or infinite loss came out of the model (check its "
            "weights) or was passed in"
        )
    return pos, neg


def roc_curve(member_scores: Any, nonmember_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """The ROC of "member if score >= t" over every distinct threshold ``t``.

    Parameters
    ----------
    member_scores, nonmember_scores
        Attack scores, higher meaning "more likely a member".

    Returns
    -------
    (fpr, tpr)
        Arrays from ``(0, 0)`` (threshold above every score) to ``(1, 1)``, one point per
        distinct score: examples with equal scores move together (a tie is one diagonal step).

    Raises
    ------
    ValueError
        Empty or non-finite scores.
    """
    pos, neg = _scores(member_scores, nonmember_scores)
    values = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-values, kind="mergesort")
    values, is_pos = values[order], is_pos[order]
    last = np.r_[np.flatnonzero(np.diff(values) != 0), values.size - 1]  # end of each tie group
    tp = np.cumsum(is_pos)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, fp / neg.size], np.r_[0.0, tp / pos.size]


def roc_auc(member_scores: Any, nonmember_scores: Any) -> float:
    """Area under the ROC: P(member score > non-member score) + P(equal) / 2 (Mann-Whitney U with
    mid-ranks; equal to the trapezoid area under :func:`roc_curve`).

    Raises
    ------
    ValueError
        Empty or non-finite scores.
    """
    pos, neg = _scores(member_scores, nonmember_scores)
    return _auc(pos, neg)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    values = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    midrank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank of each distinct value
    rank_sum = midrank[inverse[: pos.size]].sum()
    return float((rank_sum - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    """The largest TPR of a ROC point whose FPR is at most ``max_fpr`` (no interpolation: a
    threshold the attacker can actually set)."""
    if not 0 <= max_fpr <= 1:
        raise ValueError(f"max_fpr = {max_fpr!r} is invalid: a false-positive rate in [0, 1]")
    ok = np.asarray(fpr) <= max_fpr + 1e-12
    return float(np.max(np.asarray(tpr)[ok]))


def attack_metrics(
    member_scores: Any,
    nonmember_scores: Any,
    *,
    fprs: Sequence[float] = (0.01, 0.001),
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """AUC (with a bootstrap 95% interval), TPR at each FPR in ``fprs`` and the best balanced
    accuracy of one attack.

    A TPR at FPR ``f`` is reported only when ``f x (non-members) >= 1`` (at least one false
    positive allowed); below that it is ``None`` (it would be the TPR at FPR 0).

    Parameters
    ----------
    member_scores, nonmember_scores
        Scores, higher = "member".
    fprs
        False-positive rates to read the TPR at.
    bootstrap
        Resamples for the AUC interval (members and non-members resampled separately, percentile
        interval); 0 skips it.
    seed
        Seeds the bootstrap.

    Returns
    -------
    dict
        ``auc``, ``auc_ci95`` (``[low, high]`` or ``None``), ``tpr_at_fpr`` (``{"0.01": ...}``),
        ``balanced_accuracy``, ``n_members``, ``n_nonmembers``.
    """
    pos, neg = _scores(member_scores, nonmember_scores)
    fpr, tpr = roc_curve(pos, neg)
    out: dict[str, Any] = {"auc": _auc(pos, neg), "auc_ci95": None}
    if bootstrap:
        rng = np.random.default_rng([seed, 0xB007])
        aucs = np.array(
            [
                _auc(
                    pos[rng.integers(0, pos.size, pos.size)],
                    neg[rng.integers(0, neg.size, neg.size)],
                )
                for _ in range(int(bootstrap))
            ]
        )
        out["auc_ci95"] = [float(np.quantile(aucs, 0.025)), float(np.quantile(aucs, 0.975))]
    out["tpr_at_fpr"] = {
        f"{f:g}": (tpr_at_fpr(fpr, tpr, f) if f * neg.size >= 1 else None) for f in fprs
    }
    out["balanced_accuracy"] = float(np.max((tpr + 1.0 - fpr) / 2.0))
    out["n_members"], out["n_nonmembers"] = int(pos.size), int(neg.size)
    return out


# ---------------------------------------------------------------------------- the released model
def example_losses(model: Any, weights: Any, data: Any, *, batch_size: int = 64) -> np.ndarray:
    """Per-example cross-entropy of the true label under the model holding ``weights``.

    Parameters
    ----------
    model
        A :class:`~shelora_core.lora.LoraModel` with a slot for ``weights.rank``.
    weights
        The released adapter (:class:`~shelora_core.adapters.AdapterWeights`).
    data
        :class:`~shelora_core.data.ClientData` (tokenized examples with labels).
    batch_size
        Examples per forward pass.

    Returns
    -------
    numpy.ndarray
        ``float64``, one loss per example, in ``data``'s order.
    """
    import torch

    model.load(weights)
    model.model.eval()
    out = []
    with torch.no_grad():
        for b in data.batches(batch_size):
            logits = model.logits(b["input_ids"], b["attention_mask"]).float()
            loss = torch.nn.functional.cross_entropy(logits, b["labels"], reduction="none")
            out.append(loss.numpy().astype(np.float64))
    return np.concatenate(out)


def released_weights(fed: Any) -> Any:
    """The global adapter a :class:`~shelora_core.federation.Federation` releases: its last
    checkpointed broadcast read at the largest rank with the evaluator's key (what
    ``Federation.evaluate`` scores and ``export_federation`` writes).

    Raises
    ------
    CheckpointError
        The run has no checkpointed broadcast (names the folder).
    """
    from ..client import receive
    from ..errors import CheckpointError

    blob = fed.last_broadcast()
    if blob is None:
        raise CheckpointError(
            f"{fed.checkpoint_dir} holds no checkpoint: run {fed.cfg.run_name} has no global "
            "adapter to attack (run it first)"
        )
    return receive(fed.cfg, blob, rank=max(fed.cfg.client_ranks), crypto=fed.evaluator_crypto)


# ---------------------------------------------------------------------------- who is a member
def drawn_positions(n: int, *, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """The positions (into a client's ``n`` examples) that :func:`shelora_core.client.local_train`
    draws in ``steps`` minibatches with ``seed``: the same generator, permutation and reshuffle
    rule, replayed without training (``tests/test_membership.py`` checks it against the real
    loop). Sorted, unique."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=gen)
    pos, drawn = 0, []
    for _ in range(int(steps)):
        if pos + batch_size > len(order) and pos > 0:
            order, pos = torch.randperm(n, generator=gen), 0
        drawn.append(order[pos : pos + batch_size].numpy())
        pos += batch_size
    return np.unique(np.concatenate(drawn)) if drawn else np.zeros(0, np.int64)


def trained_examples(
    cfg: FederatedConfig,
    parts: Sequence[np.ndarray],
    *,
    history: Sequence[Mapping[str, Any]] | None = None,
) -> np.ndarray:
    """Indices into the run's training set of every example some local step trained on.

    Replays the server's client sampling (:func:`shelora_core.server.sample_clients`) and each
    sampled client's minibatch draws (:func:`drawn_positions` with the seed
    :func:`shelora_core.client.client_step` gives :func:`~shelora_core.client.local_train`).
    A client the round's record lists under ``"rejected"`` (``history``) did not contribute to
    that round's aggregate, so its draws of that round are left out.
    """
    from ..client import client_seed
    from ..server import sample_clients

    rejected = {
        (int(h["round"]), int(r["client_id"]))
        for h in history or ()
        for r in h.get("rejected", ())
        if r.get("client_id") is not None
    }
    used: list[np.ndarray] = []
    for rnd in range(1, cfg.rounds + 1):
        for cid in sample_clients(cfg, rnd):
            if (rnd, cid) in rejected:
                continue
            pos = drawn_positions(
                len(parts[cid]),
                steps=cfg.local_steps,
                batch_size=cfg.batch_size,
                seed=client_seed(cfg.seed, rnd, cid, 1),
            )
            used.append(np.asarray(parts[cid])[pos])
    return np.unique(np.concatenate(used)) if used else np.zeros(0, np.int64)


@dataclass(frozen=True)
class MembershipSplit:
    """Members, label-matched non-members and the reference models' training pools of a run.

    Attributes:
        members: the examples some local step trained on (a subset of the run's training set).
        nonmembers: as many examples, with the same label counts, never in the run's data.
        references: one training set per reference model, each as large as the run's training
            set, disjoint from each other, from the members and from the non-members.
        nonmember_source: ``"train split, not selected"`` or ``"test split"``.
        unused_client_examples: the clients' examples no step drew (neither members nor
            non-members).
    """

    members: Any
    nonmembers: Any
    references: tuple[Any, ...]
    nonmember_source: str
    unused_client_examples: int

    def describe(self) -> dict[str, Any]:
        return {
            "n_members": len(self.members),
            "n_nonmembers": len(self.nonmembers),
            "member_label_counts": self.members.label_counts().tolist(),
            "nonmember_source": self.nonmember_source,
            "unused_client_examples": self.unused_client_examples,
            "reference_examples": [len(r) for r in self.references],
        }


def membership_split(
    cfg: FederatedConfig, *, n_reference: int = 1, history: Sequence[Mapping] | None = None
) -> MembershipSplit:
    """Members, non-members and reference pools of ``cfg``'s run (see the module docstring).

    The population of non-members is the corpus's training split minus the run's selected
    training examples (matched by text: the corpus is de-duplicated), or the test split when
    that is too small. Seeded by ``cfg.seed``.

    Raises
    ------
    ConfigError
        The population cannot supply the non-members (per label) and the reference pools: names
        the sizes and the fix (fewer ``train_examples`` or fewer reference models).
    """
    from ..data import load_dataset
    from ..federation import split_data

    if n_reference < 0:
        raise ConfigError(f"n_reference = {n_reference!r} is invalid: give 0, 1 or 2")
    train, _, parts = split_data(cfg)
    used = trained_examples(cfg, parts, history=history)
    members = train.subset(used)
    in_clients = np.unique(np.concatenate([np.asarray(p) for p in parts]))
    full_train, full_test = load_dataset(cfg.dataset, seed=cfg.seed)
    taken = set(train.texts)
    pool = [i for i, t in enumerate(full_train.texts) if t not in taken]
    need_per_label = members.label_counts()
    need_total = len(members) + n_reference * len(train)
    candidates = [("train split, not selected", full_train.subset(pool)), ("test split", full_test)]
    fits = [
        (source, population)
        for source, population in candidates
        if len(population) >= need_total and (population.label_counts() >= need_per_label).all()
    ]
    if not fits:
        raise ConfigError(
            f"too few held-out examples for membership inference on {cfg.run_name}: "
            f"{len(members)} members (label counts {need_per_label.tolist()}) and "
            f"{n_reference} reference pool(s) of {len(train)} need {need_total} examples; the "
            f"unselected training split has {len(pool)}, the test split {len(full_test)}. Set "
            "train_examples lower or n_reference=0"
        )
    source, population = fits[0]
    rng = np.random.default_rng([cfg.seed, 0x4D1A])
    labels = population.labels
    non_idx = np.concatenate(
        [
            rng.choice(np.flatnonzero(labels == c), int(k), replace=False)
            for c, k in enumerate(need_per_label)
            if k
        ]
    )
    rest = rng.permutation(np.setdiff1d(np.arange(len(population)), non_idx))
    refs = tuple(
        population.subset(np.sort(rest[i * len(train) : (i + 1) * len(train)]))
        for i in range(n_reference)
    )
    return MembershipSplit(
        members=members,
        nonmembers=population.subset(np.sort(non_idx)),
        references=refs,
        nonmember_source=source,
        unused_client_examples=int(len(in_clients) - len(used)),
    )


# ---------------------------------------------------------------------------- settings and methods
@dataclass(frozen=True)
class Setting:
    """A training regime every method is attacked in: its base configuration (the method is
    replaced per method) and what it is for."""

    name: str
    config: FederatedConfig
    note: str


def membership_settings(profile: str) -> list[Setting]:
    """The settings of a profile.

    * ``"<profile>"``: notebook 05's encrypted-method setting (its configuration,
      :func:`~shelora_core.profiles.grid_base`, with ranks 8/16/32 and Dirichlet 0.3): the released
      models notebook 05 reports, whose checkpoints it reuses (in the quick profile the head
      trained at 0.01x the adapter's lr, :data:`~shelora_core.profiles.GRID_OVERRIDES`);
    * ``"overfit"``: fewer examples per client trained for more epochs (``quick`` only, from the
      profile's own schedule: 150 examples over 3 IID clients, 3 rounds x 12 local steps of 16,
      about 11.5 passes over each example; evaluated after the last round only), where
      members' losses separate from non-members', so the comparison between methods says
      something.
    """
    from ..profiles import ENCRYPTED_SETTING, grid_base, profile_config

    settings = [
        Setting(
            profile,
            grid_base(profile, **ENCRYPTED_SETTING),
            f"the {profile} profile, ranks 8/16/32, Dirichlet 0.3 (notebook 05's encrypted-method "
            "setting and configuration)",
        )
    ]
    if profile == "quick":
        over = profile_config(profile, **ENCRYPTED_SETTING).replace(
            train_examples=150, partition="iid", rounds=3, local_steps=12, eval_every=3
        )
        settings.append(
            Setting(
                "overfit",
                over,
                "overfit regime: 150 examples over 3 IID clients, 3 rounds x 12 local steps of "
                "16 (about 11.5 passes over each example)",
            )
        )
    return settings


def membership_methods(base: FederatedConfig) -> list[tuple[str, FederatedConfig]]:
    """``(label, config)`` of every method attacked (:data:`METHODS`), same data and seed."""
    return [(label, base.replace(**over)) for label, over in METHODS]


def dp_sweep_methods(
    base: FederatedConfig, epsilons: Sequence[float] = DP_SWEEP_EPSILONS
) -> list[tuple[str, FederatedConfig]]:
    """``(label, config)`` of every point of the DP sweep: each DP method of :data:`METHODS` at
    each whole-run target epsilon (``dp_target_epsilon``; the RDP accountant calibrates the
    clients' noise multiplier to it over the run), same data and seed as the other methods.

    Raises
    ------
    ConfigError
        An epsilon that is not a finite number > 0 (names it).
    """
    from ..accounting import DP_METHODS

    out = []
    for eps in _checked_epsilons(epsilons):
        for label, over in METHODS:
            if over["method"] in DP_METHODS:
                out.append((label, base.replace(**over, dp_target_epsilon=float(eps))))
    return out


def _checked_epsilons(epsilons: Sequence[float]) -> list[float]:
    for eps in epsilons:
        if isinstance(eps, bool) or not (
            isinstance(eps, (int, float)) and np.isfinite(eps) and eps > 0
        ):
            raise ConfigError(
                f"sweep epsilon {eps!r} is invalid: give finite whole-run epsilons > 0, e.g. "
                f"{list(DP_SWEEP_EPSILONS)}, or none to skip the sweep"
            )
    return [float(e) for e in epsilons]


#: relative shortfall of the accounted epsilon below a sweep point's target that
#: :func:`sweep_accounting_checks` accepts (the calibration bisects the noise multiplier to 1e-4)
EPSILON_RTOL = 0.01


def sweep_accounting_checks(sweep: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For each DP sweep row: is the accounted whole-run epsilon against the server at most its
    target and within :data:`EPSILON_RTOL` of it (the noise was calibrated to the target, not
    more), and the epsilon towards an observer of the released model at most that (``agree``)?"""
    out = []
    for r in sweep:
        p = r.get("privacy") or {}
        target, e_srv, e = r.get("target_epsilon"), p.get("epsilon_server"), p.get("epsilon")
        ok = (
            target is not None
            and e_srv is not None
            and e is not None
            and target * (1 - EPSILON_RTOL) <= e_srv <= target * (1 + 1e-9)
            and e <= e_srv * (1 + 1e-9)
        )
        out.append(
            {
                "setting": r["setting"],
                "method": r["method"],
                "target_epsilon": target,
                "epsilon_server": e_srv,
                "epsilon": e,
                "noise_multiplier": p.get("noise_multiplier"),
                "agree": bool(ok),
            }
        )
    return out


def _dp_point(row: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`matched_utility` and the sweep table show of one DP row."""
    p = row.get("privacy") or {}
    ra = row.get("reference_attack")
    return {
        "target_epsilon": row.get("target_epsilon"),
        "calibration": p.get("calibration"),
        "epsilon": p.get("epsilon"),
        "epsilon_server": p.get("epsilon_server"),
        "delta": p.get("delta"),
        "noise_multiplier": p.get("noise_multiplier"),
        "accuracy": row["accuracy"],
        "loss_auc": row["loss_attack"]["auc"],
        "loss_auc_ci95": row["loss_attack"].get("auc_ci95"),
        "loss_tpr_at_1pct_fpr": row["loss_attack"]["tpr_at_fpr"].get("0.01"),
        "reference_auc": None if ra is None else ra["auc"],
        "reference_auc_ci95": None if ra is None else ra.get("auc_ci95"),
        "reference_tpr_at_1pct_fpr": None if ra is None else ra["tpr_at_fpr"].get("0.01"),
    }


def matched_utility(
    rows: Sequence[Mapping[str, Any]],
    sweep: Sequence[Mapping[str, Any]] = (),
    *,
    tolerance: float = ACCURACY_TOLERANCE,
    reference: str = "flexlora",
) -> list[dict[str, Any]]:
    """Each DP method's membership-inference result at FlexLoRA's utility, per setting.

    **The rule.** A DP point *matches* when its test accuracy is at least the ``reference``
    method's (FlexLoRA's: the model SHE-LoRA also releases) minus ``tolerance`` in the same
    setting; the *matched-utility point* is the matching point with the smallest accounted
    whole-run epsilon (``privacy["epsilon"]``, the guarantee towards whoever holds the released
    model), i.e. the most private point that costs at most ``tolerance`` of accuracy. The
    points are the method's row in ``rows`` (per-round calibration) and its rows in ``sweep``
    (whole-run targets); a point without a finite epsilon (no noise) never matches. Accuracy is
    not monotone in epsilon (a run's noise is one draw; the test set is small), so a larger
    epsilon may fall below the bar again: every point is listed, the rule picks the first.

    The tolerance is tighter than the accuracy's own sampling error (binomial standard error
    about 0.034 at accuracy 0.65 on the quick profile's 200 test examples): "matched" means
    not measurably worse than FlexLoRA, not equal.

    Parameters
    ----------
    rows
        The record's method rows (:data:`METHODS`).
    sweep
        The record's DP sweep rows (:func:`dp_sweep_methods`).
    tolerance
        Accuracy FlexLoRA may lose, >= 0.
    reference
        The method label whose accuracy and AUC the DP points are matched to.

    Returns
    -------
    list of dict
        One per (setting, DP method): ``setting``, ``method``, ``rule``, ``reference`` (the
        reference method's accuracy, AUCs and TPR), ``threshold``, ``points`` (every point,
        sorted by epsilon), ``matched`` (the matched point or ``None``), ``bracketed`` (a point
        of smaller epsilon, below the bar, exists: the sweep brackets the threshold), the
        matched point's AUC minus the reference's (``loss_auc_difference``,
        ``reference_auc_difference``), whether its loss AUC lies in the reference's bootstrap
        95% interval (``loss_auc_in_reference_ci95``) and ``note`` (plain words, also when
        nothing matched).

    Raises
    ------
    ValueError
        A negative tolerance.
    """
    from ..accounting import DP_METHODS

    if not tolerance >= 0:
        raise ValueError(f"tolerance = {tolerance!r} is invalid: an accuracy margin >= 0")
    dp_labels = [lab for lab, over in METHODS if over["method"] in DP_METHODS]
    everything = list(rows) + list(sweep)
    out = []
    for setting in dict.fromkeys(r["setting"] for r in everything):
        ref = next((r for r in rows if r["setting"] == setting and r["method"] == reference), None)
        for label in dp_labels:
            mine = [r for r in everything if r["setting"] == setting and r["method"] == label]
            if not mine:
                continue
            points = sorted(
                (_dp_point(r) for r in mine),
                key=lambda p: (p["epsilon"] is None, p["epsilon"] or 0.0),
            )
            entry: dict[str, Any] = {
                "setting": setting,
                "method": label,
                "rule": (
                    f"smallest accounted whole-run epsilon whose accuracy >= {reference}'s - "
                    f"{tolerance:g}"
                ),
                "tolerance": tolerance,
                "points": points,
                "reference": None,
                "threshold": None,
                "matched": None,
                "bracketed": False,
                "loss_auc_difference": None,
                "reference_auc_difference": None,
                "loss_auc_in_reference_ci95": None,
            }
            if ref is None or ref.get("accuracy") is None:
                entry["note"] = f"no {reference} row in {setting}: nothing to match"
                out.append(entry)
                continue
            rp = _dp_point(ref)
            entry["reference"] = {
                "method": reference,
                **{k: rp[k] for k in rp if k.startswith(("accuracy", "loss_", "reference_"))},
            }
            bar = float(ref["accuracy"]) - tolerance
            entry["threshold"] = bar
            ok = [
                p
                for p in points
                if p["epsilon"] is not None
                and p["accuracy"] is not None
                and p["accuracy"] >= bar - _ACC_EPS
            ]
            if not ok:
                best = max(
                    (p for p in points if p["accuracy"] is not None),
                    key=lambda p: p["accuracy"],
                    default=None,
                )
                entry["note"] = (
                    f"no point matches: no swept epsilon reaches accuracy {bar:.3f} "
                    f"({reference} {ref['accuracy']:.3f} - {tolerance:g})"
                    + (
                        ""
                        if best is None
                        else f"; the best is {best['accuracy']:.3f} at epsilon {_eps(best)}"
                    )
                )
                out.append(entry)
                continue
            m = ok[0]
            below = [
                p
                for p in points
                if p["epsilon"] is not None
                and p["epsilon"] < m["epsilon"]
                and p["accuracy"] is not None
            ]
            entry["matched"] = m
            entry["bracketed"] = bool(below)
            entry["loss_auc_difference"] = m["loss_auc"] - rp["loss_auc"]
            ci = rp["loss_auc_ci95"]
            if ci:
                entry["loss_auc_in_reference_ci95"] = bool(ci[0] <= m["loss_auc"] <= ci[1])
            if m["reference_auc"] is not None and rp["reference_auc"] is not None:
                entry["reference_auc_difference"] = m["reference_auc"] - rp["reference_auc"]
            entry["note"] = (
                f"matched at epsilon {_eps(m)} (delta {m['delta']:g}, noise multiplier "
                f"{m['noise_multiplier']:.3g}): accuracy {m['accuracy']:.3f} vs {reference} "
                f"{ref['accuracy']:.3f}, loss AUC {m['loss_auc']:.3f} vs {rp['loss_auc']:.3f}"
                + (
                    ""
                    if entry["bracketed"]
                    else "; the smallest epsilon swept already matches, so a smaller one might too"
                )
            )
            out.append(entry)
    return out


def _eps(p: Mapping[str, Any]) -> str:
    e = p.get("epsilon")
    if e is None:
        return "none (no noise)"
    return f"{e:.0f}" if e >= 99.95 else f"{e:.1f}"  # 99.99 reads 100, not 100.0


# ---------------------------------------------------------------------------- the runner
def _encode(cfg: FederatedConfig, ds: Any, tok: Any) -> Any:
    from ..federation import encode_examples

    return encode_examples(cfg, ds, tok)


def _reference_federation(
    cfg: FederatedConfig, train: Any, *, results_dir: Path, model: Any, tok: Any
) -> Any:
    """A :class:`~shelora_core.federation.Federation` of ``cfg`` whose clients hold ``train``
    (partitioned as ``cfg`` partitions its own data) instead of the run's data."""
    from ..federation import Federation, client_datasets, client_parts
    from ..partitions import partition_stats

    fed = Federation(cfg, results_dir=results_dir, model=model, progress=False)
    parts = client_parts(cfg, train.labels)
    fed.train, fed.parts = train, parts
    fed.partition_counts = partition_stats(train.labels, parts, train.num_labels)
    fed.clients = client_datasets(cfg, train, parts, tok)
    return fed


#: per-example losses are stored rounded to this (a loss difference below it is not seen)
LOSS_RESOLUTION = 1e-6


def _round(x: np.ndarray) -> list[float]:
    return [float(v) for v in np.round(np.asarray(x, np.float64), 6)]


def _reuse_or_run(
    cfg: FederatedConfig, *, work: Path, reuse_dir: Path | None, model: Any
) -> tuple[Any, Any, bool]:
    """The finished Federation of ``cfg``: notebook 05's checkpoint under ``reuse_dir`` when it
    holds every round, else trained (or resumed) under ``work``."""
    from ..federation import Federation

    if reuse_dir is not None and (reuse_dir / "checkpoints" / cfg.run_name).is_dir():
        fed = Federation(cfg, results_dir=reuse_dir, model=model, progress=False)
        if fed.dirs.load_checkpoint(cfg.fingerprint())[0] == cfg.rounds:
            return fed, fed.run(), True
    fed = Federation(cfg, results_dir=work, model=model, progress=False)
    return fed, fed.run(), False


def _load_rows(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["key"]: r for r in rows if r.get("membership_version") == MEMBERSHIP_VERSION}


def _row_key(setting: str, cfg: FederatedConfig, n_reference: int) -> str:
    return f"{setting}/{cfg.run_name}/ref{n_reference}/v{MEMBERSHIP_VERSION}"


def run_membership(
    profile: str = "quick",
    *,
    out_dir: str | Path,
    settings: Sequence[str | Setting] | None = None,
    methods: Sequence[str] | None = None,
    n_reference: int = 1,
    reuse_dir: str | Path | None = None,
    bootstrap: int = 1000,
    progress: bool | None = None,
    sweep_epsilons: Sequence[float] = DP_SWEEP_EPSILONS,
    tolerance: float = ACCURACY_TOLERANCE,
) -> dict[str, Any]:
    """Train, attack and record every method of every setting (see the module docstring).

    Parameters
    ----------
    profile
        ``"quick"`` or ``"paper"`` (:func:`membership_settings`).
    out_dir
        Where ``membership.json`` and ``figures/membership_roc.png`` go; runs, reference models
        and finished rows under ``<out_dir>/checkpoints/membership/``.
    settings
        The profile's settings to run, by name (default: all), or :class:`Setting` objects of
        one's own.
    methods
        Labels of :data:`METHODS` to run (default: all).
    n_reference
        Reference models per setting (0 skips the reference attack).
    reuse_dir
        A results folder whose ``checkpoints/<run>`` of the same configuration (notebook 05's)
        is reused instead of training; default ``out_dir``.
    bootstrap
        Resamples of the AUC interval.
    progress
        A tqdm bar over the methods (default: off when ``SHELORA_QUIET=1``).
    sweep_epsilons
        Whole-run target epsilons of the DP sweep (:func:`dp_sweep_methods`; run for the DP
        methods among ``methods``); empty skips it.
    tolerance
        The accuracy margin of "matched utility" (:func:`matched_utility`).

    Returns
    -------
    dict
        The record written to ``membership.json``.
    """
    from ..assets import load_tokenizer
    from ..federation import build_model, quiet
    from ..provenance import run_meta

    if progress is None:
        progress = not quiet()
    if progress:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    out = Path(out_dir)
    work = out / "checkpoints" / "membership"
    work.mkdir(parents=True, exist_ok=True)
    rows_path = work / "rows.jsonl"
    done = _load_rows(rows_path)
    reuse = Path(reuse_dir) if reuse_dir is not None else out
    known = {s.name: s for s in membership_settings(profile)}
    chosen = list(known.values()) if settings is None else []
    for s in settings or ():
        if isinstance(s, Setting):
            chosen.append(s)
        elif s in known:
            chosen.append(known[s])
        else:
            raise ConfigError(
                f"settings: {s!r} is not a setting of profile {profile!r}: choose from "
                f"{list(known)} or pass a Setting"
            )
    labels = [m for m, _ in METHODS]
    if methods is not None and not set(methods) <= set(labels):
        raise ConfigError(f"methods = {list(methods)!r}: choose from {labels}")
    sweep_epsilons = _checked_epsilons(sweep_epsilons)
    if not tolerance >= 0:
        raise ConfigError(f"tolerance = {tolerance!r} is invalid: an accuracy margin >= 0")
    t_start = time.perf_counter()
    record_settings: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []
    for setting in chosen:
        base = setting.config
        split = membership_split(base, n_reference=n_reference)
        tok = load_tokenizer(base.model)
        model = build_model(base, split.members.num_labels)
        members = _encode(base, split.members, tok)
        nonmembers = _encode(base, split.nonmembers, tok)
        ref_info, ref_member, ref_non = [], [], []
        for i, pool in enumerate(split.references):
            t0 = time.perf_counter()
            ref_cfg = base.replace(method="flexlora")
            fed = _reference_federation(
                ref_cfg,
                pool,
                results_dir=work / f"reference-{setting.name}-{i}-v{MEMBERSHIP_VERSION}",
                model=model,
                tok=tok,
            )
            res = fed.run()
            w = released_weights(fed)
            ref_member.append(example_losses(model, w, members))
            ref_non.append(example_losses(model, w, nonmembers))
            ref_info.append(
                {
                    "method": "flexlora",
                    "examples": len(pool),
                    "accuracy": res.history[-1].get("accuracy"),
                    "seconds": time.perf_counter() - t0,
                }
            )
        ref_m = np.mean(ref_member, axis=0) if ref_member else None
        ref_n = np.mean(ref_non, axis=0) if ref_non else None
        record_settings.append(
            {
                "name": setting.name,
                "note": setting.note,
                "config": base.to_dict(),
                **split.describe(),
                "reference_models": ref_info,
                "reference_recipe": (
                    "FlexLoRA with this setting's configuration (seed, initial adapter, clients, "
                    "partition scheme, rounds, steps, learning rate), trained on as many examples "
                    "as the target run from the held-out population, disjoint from members and "
                    "non-members"
                ),
                "reference_losses": None
                if ref_m is None
                else {"members": _round(ref_m), "nonmembers": _round(ref_n)},
            }
        )
        todo = [
            (lab, cfg, False)
            for lab, cfg in membership_methods(base)
            if methods is None or lab in methods
        ] + [
            (lab, cfg, True)
            for lab, cfg in dp_sweep_methods(base, sweep_epsilons)
            if methods is None or lab in methods
        ]
        bar = tqdm(todo, desc=f"membership {setting.name}", disable=not progress, leave=False)
        for label, cfg, swept in bar:
            bar.set_postfix(method=label if not swept else f"{label} eps {cfg.dp_target_epsilon:g}")
            key = _row_key(setting.name, cfg, n_reference)
            if key in done:
                (sweep_rows if swept else rows).append(done[key])
                continue
            t0 = time.perf_counter()
            fed, res, reused = _reuse_or_run(cfg, work=work, reuse_dir=reuse, model=model)
            t_train = time.perf_counter() - t0
            w = released_weights(fed)
            loss_m = example_losses(model, w, members)
            loss_n = example_losses(model, w, nonmembers)
            row: dict[str, Any] = {
                "key": key,
                "membership_version": MEMBERSHIP_VERSION,
                "setting": setting.name,
                "method": label,
                "variant": cfg.variant,
                "run_name": cfg.run_name,
                # a point of the DP sweep: the whole-run epsilon its noise was calibrated to
                "sweep": swept,
                "target_epsilon": cfg.dp_target_epsilon,
                "accuracy": res.history[-1].get("accuracy"),
                "macro_f1": res.history[-1].get("macro_f1"),
                "reused_checkpoint": reused,
                # members assume every sampled client's upload was aggregated (none refused)
                "rejected_uploads": sum(len(h.get("rejected", ())) for h in res.history),
                "train_seconds": t_train,  # this call: training, resuming or reusing
                # the federation's own rounds, as recorded when they ran (also when reused)
                "federation_seconds": float(sum(h.get("seconds", 0.0) for h in res.history)),
                "mean_loss_members": float(loss_m.mean()),
                "mean_loss_nonmembers": float(loss_n.mean()),
                "loss_attack": attack_metrics(-loss_m, -loss_n, bootstrap=bootstrap, seed=cfg.seed),
                "reference_attack": None
                if ref_m is None
                else attack_metrics(
                    ref_m - loss_m, ref_n - loss_n, bootstrap=bootstrap, seed=cfg.seed
                ),
                "privacy": _privacy(cfg),
                "losses": {"members": _round(loss_m), "nonmembers": _round(loss_n)},
            }
            row["seconds"] = time.perf_counter() - t0
            row["meta"] = run_meta(cfg.seed)
            with rows_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            (sweep_rows if swept else rows).append(row)
        bar.close()
    checks = equivalence_checks(rows)
    matched = matched_utility(rows, sweep_rows, tolerance=tolerance)
    record = {
        "profile": profile,
        "statement": statement(checks, matched),
        "attacks": ATTACKS,
        "settings": record_settings,
        "rows": rows,
        "checks": checks,
        "dp_sweep": {
            "target_epsilons": [float(e) for e in sweep_epsilons],
            "calibration": (
                "dp_target_epsilon: the RDP accountant's noise multiplier for this whole-run "
                "epsilon at the setting's dp_delta, client-level, against the server "
                "(shelora_core.accounting); the method rows' DP points use the per-round "
                "dp_epsilon instead"
            ),
            "rows": sweep_rows,
            "accounting_checks": sweep_accounting_checks(sweep_rows),
            # the sweep's cost when its rows were computed (training + attack, this machine)
            "seconds": float(sum(r["seconds"] for r in sweep_rows)),
        },
        "matched_utility": matched,
        "meta": {**run_meta(), "seconds": time.perf_counter() - t_start},
    }
    return record


def _loss_diff(d: float) -> str:
    if d <= LOSS_RESOLUTION * (1 + 1e-6):
        return f"<= {LOSS_RESOLUTION:.0e} (the stored resolution)"
    return f"{d:.1e}"


def statement(
    checks: Sequence[Mapping[str, Any]], matched: Sequence[Mapping[str, Any]] | None = None
) -> str:
    """What the record says about encryption and the released model: the plain statement when
    every equivalence check agrees (the measurement that supports it), else what disagreed;
    followed by :func:`matched_statement` of ``matched`` when given."""
    return _encryption_statement(checks) + (" " + matched_statement(matched) if matched else "")


def matched_statement(matched: Sequence[Mapping[str, Any]]) -> str:
    """The DP methods at matched utility (:func:`matched_utility`), one clause per setting and
    method: the matched point's epsilon and AUC beside FlexLoRA's, or that nothing matched."""
    if not matched:
        return ""
    parts = []
    for m in matched:
        ref, pt = m["reference"], m["matched"]
        head = f"{m['method']} in {m['setting']}"
        if ref is None:
            parts.append(f"{head}: no FlexLoRA row to match")
        elif pt is None:
            best = max(
                (p["accuracy"] for p in m["points"] if p["accuracy"] is not None), default=None
            )
            parts.append(
                f"{head}: NO swept epsilon reaches accuracy {m['threshold']:.3f} (best "
                + ("-" if best is None else f"{best:.3f}")
                + f"; FlexLoRA {ref['accuracy']:.3f}), so its lower AUC is not at matched utility"
            )
        else:
            parts.append(
                f"{head}: epsilon {_eps(pt)} (whole run, delta {pt['delta']:g}) gives accuracy "
                f"{pt['accuracy']:.3f} and loss AUC {pt['loss_auc']:.3f} against FlexLoRA's "
                f"{ref['accuracy']:.3f} and {ref['loss_auc']:.3f}"
                + _ci_words(m)
                + ("" if m["bracketed"] else " (the smallest epsilon swept)")
            )
    tol = matched[0]["tolerance"]
    return (
        f"At matched utility (the smallest accounted epsilon whose accuracy is within {tol:g} "
        "of FlexLoRA's or above): " + "; ".join(parts) + "."
    )


def _ci_words(m: Mapping[str, Any]) -> str:
    """Where the matched point's loss AUC lies against FlexLoRA's bootstrap interval."""
    ci = m["reference"] and m["reference"].get("loss_auc_ci95")
    if m.get("loss_auc_in_reference_ci95") is None or not ci:
        return ""
    auc = m["matched"]["loss_auc"]
    where = "inside" if m["loss_auc_in_reference_ci95"] else "below" if auc < ci[0] else "above"
    return f", {where} FlexLoRA's 95% interval [{ci[0]:.3f}, {ci[1]:.3f}]"


def _encryption_statement(checks: Sequence[Mapping[str, Any]]) -> str:
    bad = [c for c in checks if not c["agree"]]
    if not checks:
        return "no encrypted method was run beside its plaintext twin: nothing to compare"
    if bad:
        return "encrypted and plaintext released models DIFFER: " + "; ".join(
            f"{c['setting']}: {c['encrypted']} vs {c['plaintext']}" for c in bad
        )
    return (
        "Encryption of the updates does not protect the released model: the clients decrypt the "
        "aggregate, and the global model they release is plaintext FlexLoRA's (FedAvg's) up to "
        "CKKS noise, so membership inference on it succeeds exactly as well (every check in "
        "'checks' agrees: "
        + ", ".join(
            f"{c['encrypted']} = {c['plaintext']} in {c['setting']}, largest per-example loss "
            f"difference {_loss_diff(c['max_abs_loss_difference'])}"
            for c in checks
        )
        + "). Only noise in training changes it: the DP methods (shelora-dp noises only the "
        "plaintext part of an upload; its encrypted columns are exact)."
    )


ATTACKS = {
    "loss": "loss threshold (Yeom et al. 2018): score = -cross-entropy of the true label",
    "reference": (
        "calibrated loss (Watson et al. 2022; offline LiRA with few models): score = mean "
        "reference-model loss - target loss"
    ),
    "members": "the clients' examples some local step drew (replayed from the training seeds)",
    "nonmembers": "held-out examples of the same split, label counts matched to the members",
    "tpr_at_fpr": "largest TPR at FPR <= f on the step ROC; None when f x non-members < 1",
    "balanced_accuracy": "at the best threshold, chosen on the same examples (optimistic)",
}


def _privacy(cfg: FederatedConfig) -> dict[str, Any] | None:
    from ..accounting import run_privacy

    return run_privacy(cfg, cfg.rounds)


def equivalence_checks(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For each pair of :data:`EQUIVALENT` in each setting: the largest per-example loss
    difference, the AUC differences of both attacks and whether they are within
    :data:`LOSS_TOLERANCE` and :data:`AUC_TOLERANCE` (``agree``)."""
    by = {(r["setting"], r["method"]): r for r in rows}
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for a, b in EQUIVALENT:
            ra, rb = by.get((setting, a)), by.get((setting, b))
            if ra is None or rb is None:
                continue
            diff = max(
                float(np.max(np.abs(np.subtract(ra["losses"][k], rb["losses"][k]))))
                for k in ("members", "nonmembers")
            )
            d_loss = abs(ra["loss_attack"]["auc"] - rb["loss_attack"]["auc"])
            d_ref = None
            if ra["reference_attack"] and rb["reference_attack"]:
                d_ref = abs(ra["reference_attack"]["auc"] - rb["reference_attack"]["auc"])
            out.append(
                {
                    "setting": setting,
                    "encrypted": a,
                    "plaintext": b,
                    "max_abs_loss_difference": diff,
                    "loss_auc_difference": d_loss,
                    "reference_auc_difference": d_ref,
                    "accuracy": [ra["accuracy"], rb["accuracy"]],
                    "loss_resolution": LOSS_RESOLUTION,  # losses are stored to 6 decimals
                    "agree": bool(
                        diff <= LOSS_TOLERANCE
                        and d_loss <= AUC_TOLERANCE
                        and (d_ref is None or d_ref <= AUC_TOLERANCE)
                    ),
                }
            )
    return out


def _matched(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    if record.get("matched_utility") is not None:
        return list(record["matched_utility"])
    sweep = (record.get("dp_sweep") or {}).get("rows", ())
    return matched_utility(record["rows"], sweep)


def sweep_table(record: Mapping[str, Any]) -> str:
    """A markdown table of the DP points of every setting (:func:`matched_utility`): FlexLoRA's
    row, then each DP method's points by accounted epsilon, with the calibration (the per-round
    default or the whole-run target), the accounted whole-run (epsilon, delta), the noise
    multiplier, accuracy, both AUCs, TPR at 1% FPR and which point is the matched-utility one.
    Empty string when the record has no DP row."""
    matched = _matched(record)
    if not matched:
        return ""
    lines = [
        "| setting | method | calibration | accounted epsilon, delta (run) | noise multiplier "
        "| accuracy | loss AUC [95% CI] | ref AUC [95% CI] | TPR@1%FPR loss / ref | matched |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def auc(v: float | None, ci: Sequence[float] | None) -> str:
        if v is None:
            return "-"
        return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    def num(v: float | None, fmt: str = "{:.3f}") -> str:
        return "-" if v is None else fmt.format(v)

    shown = set()
    for m in matched:
        ref = m["reference"]
        if ref is not None and m["setting"] not in shown:
            shown.add(m["setting"])
            lines.append(
                f"| {m['setting']} | {ref['method']} | - | - | - | {num(ref['accuracy'])} | "
                f"{auc(ref['loss_auc'], ref['loss_auc_ci95'])} | "
                f"{auc(ref['reference_auc'], ref['reference_auc_ci95'])} | "
                f"{num(ref['loss_tpr_at_1pct_fpr'])} / {num(ref['reference_tpr_at_1pct_fpr'])} "
                f"| bar: accuracy >= {num(m['threshold'])} |"
            )
        for p in m["points"]:
            cal = (
                f"target {p['target_epsilon']:g}"
                if p["target_epsilon"] is not None
                else "per round"
                if p["calibration"] == "per_round_analytic"
                else str(p["calibration"])
            )
            is_m = m["matched"] is not None and p == m["matched"]
            acc_ok = (
                m["threshold"] is not None
                and p["accuracy"] is not None
                and p["accuracy"] >= m["threshold"] - _ACC_EPS
            )
            lines.append(
                f"| {m['setting']} | {m['method']} | {cal} | {_eps(p)}, {num(p['delta'], '{:g}')} "
                f"| {num(p['noise_multiplier'])} | {num(p['accuracy'])} | "
                f"{auc(p['loss_auc'], p['loss_auc_ci95'])} | "
                f"{auc(p['reference_auc'], p['reference_auc_ci95'])} | "
                f"{num(p['loss_tpr_at_1pct_fpr'])} / {num(p['reference_tpr_at_1pct_fpr'])} | "
                + ("**matched**" if is_m else "above the bar" if acc_ok else "")
                + " |"
            )
        if m["matched"] is None:
            lines.append(f"| {m['setting']} | {m['method']} | | | | | | | | no point matches |")
    return "\n".join(lines)


def summary_table(record: Mapping[str, Any]) -> str:
    """A markdown table of the record: setting, method, accuracy, both AUCs, TPR at 1% FPR,
    n, the DP run's epsilon, the federation's training seconds (as recorded when its rounds
    ran) and the attack's seconds (losses, metrics); followed, when the record has DP points,
    by :func:`sweep_table` (the DP sweep and the matched-utility points)."""
    lines = [
        "| setting | method | accuracy | loss AUC [95% CI] | ref AUC [95% CI] | TPR@1%FPR loss / ref "
        "| n (members = non-members) | DP epsilon (run) | training s | attack s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def auc(m: Mapping[str, Any] | None) -> str:
        if m is None:
            return "-"
        ci = m.get("auc_ci95")
        return f"{m['auc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    def tpr(m: Mapping[str, Any] | None) -> str:
        v = None if m is None else m["tpr_at_fpr"].get("0.01")
        return "-" if v is None else f"{v:.3f}"

    def train(r: Mapping[str, Any]) -> str:
        v = r.get("federation_seconds")
        return "-" if v is None else f"{v:.0f}"

    def eps(r: Mapping[str, Any]) -> str:
        p = r.get("privacy")
        return "-" if not p or p.get("epsilon") is None else f"{p['epsilon']:.1f}"

    for r in record["rows"]:
        la, ra = r["loss_attack"], r["reference_attack"]
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        lines.append(
            f"| {r['setting']} | {r['method']} | {acc} | {auc(la)} | {auc(ra)} | "
            f"{tpr(la)} / {tpr(ra)} | {la['n_members']} | {eps(r)} | {train(r)} | "
            f"{r['seconds'] - r.get('train_seconds', 0.0):.0f} |"
        )
    sweep = sweep_table(record)
    if sweep:
        lines += ["", "DP points and matched utility:", "", sweep]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- figure
_COLORS = {
    "fedavg": "tab:brown",
    "flexlora": "tab:red",
    "shelora-delta": "tab:blue",
    "fedshield": "tab:gray",
    "flexlora-dp": "tab:orange",
    "shelora-dp": "tab:green",
}
_LINES = {"shelora-delta": "--", "fedshield": "--"}  # drawn over their plaintext twins


def roc_figure(record: Mapping[str, Any]):
    """ROC curves of every method: one row per setting, the loss attack and the reference attack
    side by side, log-log axes (the low-FPR region is what matters), chance as a dotted line.
    The legend gives each method's accuracy and AUC. Returns the Figure."""
    import matplotlib.pyplot as plt

    names = [s["name"] for s in record["settings"]]
    ref = {s["name"]: s.get("reference_losses") for s in record["settings"]}
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 4.2 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j, attack in enumerate(("loss", "reference")):
            ax = axes[i][j]
            for r in (r for r in record["rows"] if r["setting"] == name):
                lm, ln = np.asarray(r["losses"]["members"]), np.asarray(r["losses"]["nonmembers"])
                if attack == "reference":
                    if ref[name] is None:
                        continue
                    sm = np.asarray(ref[name]["members"]) - lm
                    sn = np.asarray(ref[name]["nonmembers"]) - ln
                    auc = r["reference_attack"]["auc"]
                else:
                    sm, sn, auc = -lm, -ln, r["loss_attack"]["auc"]
                fpr, tpr = roc_curve(sm, sn)
                acc = r["accuracy"]
                ax.plot(
                    np.maximum(fpr, 1e-4),
                    np.maximum(tpr, 1e-4),
                    _LINES.get(r["method"], "-"),
                    color=_COLORS.get(r["method"]),
                    lw=1.4,
                    label=f"{r['method']} (acc {acc:.2f}, AUC {auc:.3f})",
                )
            grid = np.logspace(-4, 0, 50)
            ax.plot(grid, grid, ":", color="black", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(1e-3, 1)
            ax.set_ylim(1e-3, 1)
            ax.set_xlabel("false-positive rate")
            ax.set_ylabel("true-positive rate")
            ax.set_title(f"{name}: {attack} attack", fontsize=10)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="lower right")
            else:
                ax.text(0.5, 0.5, "no reference model", ha="center", transform=ax.transAxes)
            ax.grid(alpha=0.3, which="both")
    fig.suptitle("Membership inference on the released global model")
    fig.tight_layout()
    return fig


def utility_figure(record: Mapping[str, Any]):
    """Attack AUC against test accuracy: one row per setting, the loss attack and the reference
    attack side by side. Each DP method's points (the per-round default and the sweep) are joined
    in order of epsilon and labelled with their accounted whole-run epsilon, with the bootstrap
    95% interval as error bars; FlexLoRA (with its interval) and SHE-LoRA (which releases the
    same model) are the reference points; the dashed vertical line is the matched-utility bar (FlexLoRA's accuracy
    minus the tolerance) and the matched point is ringed. Chance (AUC 0.5) is dotted. Returns the
    Figure."""
    import matplotlib.pyplot as plt

    matched = _matched(record)
    names = list(dict.fromkeys(m["setting"] for m in matched)) or [
        s["name"] for s in record["settings"]
    ]
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 4.2 * len(names)), squeeze=False)
    plain = {(r["setting"], r["method"]): r for r in record["rows"]}
    for i, name in enumerate(names):
        for j, attack in enumerate(("loss", "reference")):
            ax = axes[i][j]
            key, ci_key = f"{attack}_auc", f"{attack}_auc_ci95"
            drawn = False
            for lab, marker, face in (("flexlora", "*", None), ("shelora-delta", "o", "none")):
                r = plain.get((name, lab))
                if r is None or r["accuracy"] is None:
                    continue
                m = r[f"{attack}_attack"]
                if m is None:
                    continue
                ci = m.get("auc_ci95")
                ax.errorbar(
                    r["accuracy"],
                    m["auc"],
                    yerr=None if not ci or face else [[m["auc"] - ci[0]], [ci[1] - m["auc"]]],
                    fmt=marker,
                    ms=14 if marker == "*" else 11,
                    color=_COLORS[lab],
                    mfc=face or _COLORS[lab],
                    mew=1.5,
                    capsize=3,
                    label=f"{lab} (acc {r['accuracy']:.2f}, AUC {m['auc']:.3f})",
                    zorder=3,
                )
                drawn = True
            for m in (m for m in matched if m["setting"] == name):
                pts = [
                    p
                    for p in m["points"]
                    if p.get(key) is not None and p.get("accuracy") is not None
                ]
                if not pts:
                    continue
                x = np.array([p["accuracy"] for p in pts])
                y = np.array([p[key] for p in pts])
                err = np.array(
                    [
                        [p[key] - p[ci_key][0], p[ci_key][1] - p[key]]
                        if p.get(ci_key)
                        else [0.0, 0.0]
                        for p in pts
                    ]
                ).T
                color = _COLORS.get(m["method"])
                ax.errorbar(
                    x, y, yerr=err, fmt="-o", color=color, ms=5, lw=1.2, capsize=2,
                    label=f"{m['method']} (epsilon sweep)",
                )  # fmt: skip
                for p in pts:
                    ax.annotate(
                        _eps(p),
                        (p["accuracy"], p[key]),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=7,
                        color=color,
                    )
                hit = m["matched"]
                if hit is not None and hit.get(key) is not None:
                    ax.plot(hit["accuracy"], hit[key], "o", ms=13, mfc="none", mec=color, mew=1.8)
                if m["threshold"] is not None:
                    ax.axvline(m["threshold"], ls="--", color="black", lw=0.8)
                drawn = True
            ax.axhline(0.5, ls=":", color="black", lw=0.8)
            ax.set_xlabel("test accuracy")
            ax.set_ylabel(f"{attack} attack AUC")
            ax.set_title(f"{name}: {attack} attack (labels: accounted epsilon, run)", fontsize=10)
            if drawn:
                ax.legend(fontsize=7, loc="upper left")
            else:
                ax.text(0.5, 0.5, "nothing to show", ha="center", transform=ax.transAxes)
            ax.grid(alpha=0.3)
    fig.suptitle(
        "Membership inference against utility: DP methods across epsilon (dashed: matched-utility bar)"
    )
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``python -m shelora_core.attacks.membership --profile quick [--results DIR]``."""
    import matplotlib

    matplotlib.use("Agg")
    from ..notebook import write_json
    from ..plots import save

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=("quick", "paper"), default="quick")
    ap.add_argument("--results", type=Path, default=Path("results"), help="results root")
    ap.add_argument("--settings", nargs="*", default=None, help="subset of the settings")
    ap.add_argument("--methods", nargs="*", default=None, help="subset of the methods")
    ap.add_argument("--references", type=int, default=1, help="reference models per setting")
    ap.add_argument("--reuse", type=Path, default=None, help="results folder of notebook 05")
    ap.add_argument(
        "--sweep-epsilons",
        nargs="*",
        type=float,
        default=list(DP_SWEEP_EPSILONS),
        help="whole-run target epsilons of the DP sweep (none: no sweep)",
    )
    ap.add_argument(
        "--tolerance",
        type=float,
        default=ACCURACY_TOLERANCE,
        help="matched utility: accuracy at least FlexLoRA's minus this",
    )
    args = ap.parse_args(argv)
    out = args.results / args.profile
    record = run_membership(
        args.profile,
        out_dir=out,
        settings=args.settings,
        methods=args.methods,
        n_reference=args.references,
        reuse_dir=args.reuse,
        sweep_epsilons=args.sweep_epsilons,
        tolerance=args.tolerance,
    )
    path = write_json(record, out / "membership.json")
    save(roc_figure(record), out / "figures" / "membership_roc.png")
    if record["matched_utility"]:
        save(utility_figure(record), out / "figures" / "membership_utility.png")
    print(summary_table(record))
    for c in record["checks"]:
        print(
            f"{c['setting']}: {c['encrypted']} vs {c['plaintext']}: max |loss diff| "
            f"{c['max_abs_loss_difference']:.2e}, loss-AUC diff {c['loss_auc_difference']:.2e}"
            f" -> {'agree' if c['agree'] else 'DISAGREE'}"
        )
    for c in record["dp_sweep"]["accounting_checks"]:
        if not c["agree"]:
            print(
                f"{c['setting']}: {c['method']} target epsilon {c['target_epsilon']}: accounted "
                f"{c['epsilon_server']} -> DISAGREE"
            )
    for m in record["matched_utility"]:
        print(f"{m['setting']}: {m['method']}: {m['note']}")
    print("wrote", path)
    ok = all(c["agree"] for c in record["checks"] + record["dp_sweep"]["accounting_checks"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
