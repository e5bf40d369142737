"""The attack grid: DAGER on every method's real upload, cell by cell, resumable.

For every method the victim client (:mod:`~shelora_core.attacks.victim`) runs its real
client-side code and the attacker (:mod:`~shelora_core.attacks.threat`) reads only what crosses
the wire (docs/design.md, "Threat model"). :func:`attack_plan` lists the cells of a profile,
:func:`run_grid` writes one row per (cell, batch) to a JSONL checkpoint, so an interrupted grid
resumes, and :func:`summarize` averages them into the table rows.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapters import AdapterWeights, layer_index
from ..ckks.errors import CKKSError
from .dager import match_sentences, score_reconstruction
from .dager import token_set_scores as _token_scores
from .optimisation import OptimisationSettings, attack_view, matching_distance
from .threat import (
    METHODS,
    THREAT_ATTACKERS,
    attack_upload,
    observed_update,
    server_knowledge,
    server_view,
    try_decrypt,
)
from .victim import Victim, client_upload

__all__ = [
    "GRID_ATTACKERS",
    "OPTIMISATION",
    "PAPER_ROUGE1",
    "Cell",
    "apply_overrides",
    "attack_plan",
    "run_grid",
    "summarize",
]

#: SHE-LoRA paper (Liu et al., ICLR 2026), DAGER ROUGE-1 (%) on SST-2, batch 4 / 8 / 16
PAPER_ROUGE1: dict[str, dict[int, float]] = {
    "flexlora": {4: 95.18, 8: 61.14, 16: 10.27},
    "shelora": {4: 0.72, 8: 0.98, 16: 0.0},
    "flexlora-dp": {4: 86.25, 8: 80.28, 16: 68.62},
    "maskcrypt": {4: 89.16, 8: 61.49, 16: 10.91},
}

#: the optimisation-based attacker (:mod:`~shelora_core.attacks.optimisation`): gradient
#: matching, not a span check; adaptive masking (it knows the encrypted columns, as the server
#: does)
OPTIMISATION = "optimisation"
#: attackers a cell may name: DAGER's (and its B-channel variant) and the optimisation one
GRID_ATTACKERS: tuple[str, ...] = (*THREAT_ATTACKERS, OPTIMISATION)
#: methods the optimisation attacker runs on: their plaintext hides at most columns of A
OPTIMISATION_METHODS: tuple[str, ...] = ("flexlora", "flexlora-dp", "shelora", "shelora-dp")
#: default caps of an optimisation cell (Adam steps, seconds per batch)
OPT_ITERS, OPT_SECONDS = 40, 60.0


@dataclass(frozen=True)
class Cell:
    """One row of the attack table (averaged over ``n_batches`` batches).

    ``update``: ``"round1"`` / ``"later"`` (one SGD step from the round-1 / a later broadcast),
    ``"round1-secret-a"``, ``"multistep"`` (the training loop's AdamW steps) or
    ``"multistep-sgd"`` (``steps`` plain-SGD steps at ``lr`` from a later broadcast; the attacker
    divides the weight difference by ``steps * lr``). ``attacker``: one of
    :data:`~shelora_core.attacks.threat.THREAT_ATTACKERS`. ``span_tol``: DAGER's relative
    distance threshold (``None``: the attack's default, 1e-3); an attacker facing several local
    steps loosens it, since the second layer's inputs drift between the steps.
    ``opt_iters`` / ``opt_seconds``: the optimisation attacker's hard caps per batch (Adam steps,
    wall-clock seconds; ``None``: :data:`OPT_ITERS`, :data:`OPT_SECONDS`); no other attacker
    takes them. The optimisation attacker runs on :data:`OPTIMISATION_METHODS` after one SGD step
    (``round1`` or ``later``).
    """

    method: str
    attacker: str
    batch_size: int
    rank: int
    update: str
    budget: int | None = None
    dp_sigma: float | None = None
    dp_epsilon: float | None = None
    lr: float = 1e3
    steps: int | None = None
    span_tol: float | None = None
    opt_iters: int | None = None
    opt_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.attacker not in GRID_ATTACKERS:
            raise ValueError(
                f"unknown attacker {self.attacker!r}; choose one of {list(GRID_ATTACKERS)}"
            )
        if self.attacker == OPTIMISATION:
            if self.method not in OPTIMISATION_METHODS or self.update not in ("round1", "later"):
                raise ValueError(
                    f"the optimisation attacker runs on methods {list(OPTIMISATION_METHODS)} "
                    f"after one SGD step (update 'round1' or 'later'); got method="
                    f"{self.method!r}, update={self.update!r}"
                )
            if self.opt_iters is not None and self.opt_iters < 1:
                raise ValueError(f"opt_iters must be >= 1 (got {self.opt_iters})")
            if self.opt_seconds is not None and not self.opt_seconds > 0:
                raise ValueError(f"opt_seconds must be > 0 (got {self.opt_seconds})")
        elif self.opt_iters is not None or self.opt_seconds is not None:
            raise ValueError(
                f"opt_iters / opt_seconds are caps of the optimisation attacker; attacker "
                f"{self.attacker!r} takes none (got {self.opt_iters!r}, {self.opt_seconds!r})"
            )
        if (self.update == "multistep-sgd") != (self.steps is not None):
            raise ValueError(
                f"a 'multistep-sgd' cell needs steps >= 1 and no other update takes steps (got "
                f"update={self.update!r}, steps={self.steps!r})"
            )
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 (got {self.steps})")
        if self.span_tol is not None and not self.span_tol > 0:
            raise ValueError(f"span_tol must be > 0 or None (got {self.span_tol})")

    @property
    def key(self) -> str:
        fields = asdict(self)
        # the key of every cell from before these fields
        for name in ("steps", "span_tol", "opt_iters", "opt_seconds"):
            if fields[name] is None:
                del fields[name]
        return json.dumps(fields, sort_keys=True)

    @property
    def group(self) -> tuple[int, str, int, float, int | None]:
        """Cells sharing one local training per batch."""
        return (self.rank, self.update, self.batch_size, self.lr, self.steps)

    @property
    def step_lr(self) -> float | None:
        """What the attacker divides the weight difference by (``None``: the plan's AdamW lr)."""
        if self.update == "multistep":
            return None
        return self.lr * (self.steps or 1)


def attack_plan(profile: str) -> dict[str, Any]:
    """The grid of a profile: its cells and data settings.

    ``quick``: short sentences at rank 128, batch 1 and 2 in round 1 and batch 1 in a later round,
    every method, budget 4, plus one cell each of multi-step SGD, the B channel and SHE-LoRA-DP,
    both attackers of round 1 with a secret initial A, the optimisation attacker's two cells:
    about two minutes at one thread. ``paper``: batch 1/2/4/8, ranks 256 (where the unprotected
    attack works), 64/128 (FlexLoRA only) and 8/16/32 (training ranks), round 1 / later /
    multi-step AdamW, budgets 1/2/4/8/16, DP at epsilon 10 plus a noise sweep, a secret round-1
    ``A``, the learning-rate (float32) sweep; multi-step plain SGD (2/5/10 steps at lr 1e2 and 1e3,
    r = 32 at 1e1 and 1e2; DAGER's threshold and a loosened one), the B-channel attacker and
    SHE-LoRA-DP at epsilon 10: about two hours at one thread.

    The optimisation attacker (:mod:`~shelora_core.attacks.optimisation`, gradient matching,
    not a span check) has its own cells, FlexLoRA and SHE-LoRA (budget 4, adaptive masking):
    ``quick``, two cells at batch 1, r = 128, a later round, each capped at 15 Adam steps and
    25 s per batch (about a minute for both at one thread; on a busy 2-core machine the time cap
    ends them first, which their records say); ``paper``, 16 cells, batch 1 and 2, r = 32 and
    256, round 1 and a later round, capped at 25 steps and 32 s per batch: 48 attacks, about 30
    minutes at one thread. One Adam step on SmolLM2 costs about 1 s at one idle thread for a
    short sentence (2-3 s on a loaded 2-core machine), so these caps allow a few tens of steps,
    far fewer than the thousands the optimisation attacks of the literature run.
    """
    if profile == "quick":
        settings = dict(
            n_batches=1,
            max_tokens=14,
            negotiation_clients=2,
            calibration_examples=8,
            dp_sigmas=(),
            local_steps=5,
            local_lr=1e-3,
            head_lr=1e-3,
        )
        cells = _cells(
            batch_sizes=(1, 2), ranks=(128,), updates=("round1",), budgets=(4,), dp_sigmas=()
        )
        cells += _cells(
            batch_sizes=(1,), ranks=(128,), updates=("later",), budgets=(4,), dp_sigmas=()
        )
        cells += [
            Cell("flexlora", "oblivious", 1, 128, "multistep-sgd", steps=2),
            Cell("flexlora", "b-channel", 1, 128, "later"),
            Cell("shelora-dp", "adaptive", 1, 128, "later", budget=4, dp_epsilon=10.0),
            # round 1 with a secret initial A (the secret_init variant notebook 05 trains)
            *(
                Cell("shelora", a, 1, 128, "round1-secret-a", budget=4)
                for a in ("oblivious", "adaptive")
            ),
        ]
        # the optimisation attacker (not a span check), FlexLoRA and SHE-LoRA in a later round
        cells += [
            Cell(m, OPTIMISATION, 1, 128, "later", budget=k, opt_iters=15, opt_seconds=25.0)
            for m, k in (("flexlora", None), ("shelora", 4))
        ]
    elif profile == "paper":
        settings = dict(
            n_batches=3,
            max_tokens=24,
            negotiation_clients=3,
            calibration_examples=32,
            dp_sigmas=(1e-4, 1e-6, 1e-8, 1e-10, 1e-11, 1e-12),
            local_steps=5,
            local_lr=1e-3,
            head_lr=1e-3,
        )
        cells = _cells(
            batch_sizes=(1, 2, 4, 8),
            ranks=(256,),
            updates=("round1", "later"),
            budgets=(1, 2, 4, 8, 16),
            dp_sigmas=settings["dp_sigmas"],
        )
        # training ranks: the unprotected attack and SHE-LoRA / MaskCrypt at budget 8
        cells += _cells(
            batch_sizes=(1, 2, 4),
            ranks=(8, 16, 32),
            updates=("round1", "later"),
            budgets=(8,),
            dp_sigmas=(),
            methods=("flexlora", "maskcrypt", "shelora", "fedshield"),
        )
        # where the unprotected attack stops working: ranks 64 and 128 at every batch size
        cells += _cells(
            batch_sizes=(1, 2, 4, 8),
            ranks=(64, 128),
            updates=("round1",),
            budgets=(),
            dp_sigmas=(),
            methods=("flexlora",),
        )
        # the real multi-step local update (AdamW): unprotected and SHE-LoRA
        cells += _cells(
            batch_sizes=(1, 4),
            ranks=(256, 32),
            updates=("multistep",),
            budgets=(4,),
            dp_sigmas=(),
            methods=("flexlora", "shelora"),
        )
        # what SHE-LoRA would need round 1 to hide anything: a secret initial A (pessimistic)
        cells += [
            Cell("shelora", a, bs, 256, "round1-secret-a", budget=k)
            for bs in (1, 2, 4)
            for k in (1, 4, 16)
            for a in ("oblivious", "adaptive")
        ]
        # float32 uploads: one SGD step is seen through rounded weights; smaller lr, more noise
        cells += [
            Cell("flexlora", "oblivious", bs, 256, "later", lr=lr)
            for bs in (1, 4)
            for lr in (1.0, 10.0, 100.0)
        ]
        # DAGER's FedAvg setting: several plain-SGD steps on the batch, beside AdamW's multistep;
        # DAGER as written, and with its threshold loosened to 1e-2 for the drift of the steps.
        # Rank 32 at a tenth of the rates: its scaling alpha / r is 8x rank 256's, and at lr 1e3
        # its local SGD diverges within two steps (SHE-LoRA's upload refuses the values)
        cells += [
            Cell(m, a, bs, r, "multistep-sgd", budget=k, lr=lr, steps=steps, span_tol=tol)
            for r, lrs in ((256, (1e2, 1e3)), (32, (1e1, 1e2)))
            for bs in (1, 4)
            for lr in lrs
            for steps in (2, 5, 10)
            for m, a, k, tol in _MULTISTEP_SGD
        ]
        # the B channel: recovery from the update of B alone (SHE-LoRA never encrypts B)
        cells += [
            Cell(m, "b-channel", bs, r, upd, budget=k)
            for r, budgets in ((256, (4, 8, 16)), (32, (8,)))
            for upd in ("round1", "later")
            for bs in (1, 2, 4, 8)
            for m, k in (("flexlora", None), *(("shelora", k) for k in budgets))
        ]
        # SHE-LoRA with local DP on its plaintext part, at the authors' epsilon
        cells += _cells(
            batch_sizes=(1, 2, 4, 8),
            ranks=(256,),
            updates=("round1", "later"),
            budgets=(4,),
            dp_sigmas=(),
            methods=("shelora-dp",),
        )
        # the optimisation attacker (gradient matching on every layer's update, not a span
        # check): FlexLoRA and SHE-LoRA (adaptive masking) at budget 4, a training rank and 256
        cells += [
            Cell(m, OPTIMISATION, bs, r, upd, budget=k, opt_iters=25, opt_seconds=32.0)
            for r in (32, 256)
            for upd in ("round1", "later")
            for bs in (1, 2)
            for m, k in (("flexlora", None), ("shelora", 4))
        ]
    else:
        raise ValueError(f"unknown profile {profile!r}; choose 'quick' or 'paper'")
    return {"profile": profile, "cells": cells, **settings}


#: (method, attacker, budget, span_tol) of the multi-step SGD cells: FlexLoRA and SHE-LoRA at
#: budget 4, DAGER's threshold and a loosened one (not for the oblivious SHE-LoRA attacker, whose
#: view misses the hidden columns whatever the threshold)
_MULTISTEP_SGD = (
    ("flexlora", "oblivious", None, None),
    ("flexlora", "oblivious", None, 1e-2),
    ("shelora", "oblivious", 4, None),
    ("shelora", "adaptive", 4, None),
    ("shelora", "adaptive", 4, 1e-2),
)
#: methods of the main blocks of the plans (SHE-LoRA-DP has its own cells)
_GRID_METHODS = tuple(m for m in METHODS if m != "shelora-dp")


def _cells(
    *,
    batch_sizes: Sequence[int],
    ranks: Sequence[int],
    updates: Sequence[str],
    budgets: Sequence[int],
    dp_sigmas: Sequence[float],
    methods: Sequence[str] = _GRID_METHODS,
) -> list[Cell]:
    out: list[Cell] = []
    for r in ranks:
        for upd in updates:
            for bs in batch_sizes:
                for m in methods:
                    if m in ("flexlora", "fedshield", "full_he"):
                        out.append(Cell(m, "oblivious", bs, r, upd))
                    elif m == "flexlora-dp":
                        out.append(Cell(m, "oblivious", bs, r, upd, dp_epsilon=10.0))
                        out += [Cell(m, "oblivious", bs, r, upd, dp_sigma=s) for s in dp_sigmas]
                    elif m == "shelora-dp":
                        out += [
                            Cell(m, a, bs, r, upd, budget=k, dp_epsilon=10.0)
                            for k in budgets
                            for a in ("oblivious", "adaptive")
                        ]
                    elif m == "shelora+first-layers":
                        out += [
                            Cell(m, a, bs, r, upd, budget=max(budgets))
                            for a in ("oblivious", "adaptive")
                        ]
                    else:
                        out += [
                            Cell(m, a, bs, r, upd, budget=k)
                            for k in budgets
                            for a in ("oblivious", "adaptive")
                        ]
    return out


def sample_sentences(
    n: int, *, max_tokens: int, seed: int = 0, exclude: Sequence[str] = ()
) -> tuple[list[str], list[int]]:
    """``n`` Rotten Tomatoes training snippets of at most ``max_tokens`` SmolLM2 tokens, seeded,
    with their labels."""
    from ..assets import load_tokenizer
    from ..data import load_dataset

    if n <= 0:
        return [], []
    train, _ = load_dataset("rotten_tomatoes", seed=0)
    tok = load_tokenizer("smollm2")
    order = np.random.default_rng([seed, 0x5E7]).permutation(len(train))
    skip = set(exclude)
    texts, labels = [], []
    for i in order:
        t = train.texts[int(i)]
        if t in skip or len(tok(t, add_special_tokens=False)["input_ids"]) > max_tokens:
            continue
        texts.append(t)
        labels.append(int(train.labels[int(i)]))
        if len(texts) == n:
            break
    return texts, labels


def run_grid(
    plan: Mapping[str, Any],
    *,
    checkpoint: str | Path,
    victim: Victim | None = None,
    public_model: Any = None,
    progress: bool | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run (or resume) the cells of ``plan``; returns the per-(cell, batch) records.

    Each record is appended to ``checkpoint`` (JSONL) as soon as it is measured; records already
    there are not recomputed.
    """
    from tqdm.auto import tqdm

    from ..assets import load_classifier
    from ..federation import quiet

    cells: list[Cell] = list(plan["cells"])
    n_batches = int(plan["n_batches"])
    max_batch = max(c.batch_size for c in cells)
    path = Path(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[(rec["key"], rec["batch"])] = rec
    todo = [(c, b) for c in cells for b in range(n_batches) if (c.key, b) not in done]
    bar = tqdm(
        total=len(cells) * n_batches,
        initial=len(cells) * n_batches - len(todo),
        desc="attack grid",
        disable=quiet() if progress is None else not progress,
    )
    if todo:
        victim = victim or Victim(sorted({c.rank for c in cells}), seed=seed)
        public_model = public_model or load_classifier("smollm2", num_labels=2, seed=seed)
        pool, labels = sample_sentences(
            n_batches * max_batch, max_tokens=int(plan["max_tokens"]), seed=seed
        )
        others, _ = sample_sentences(
            (plan["negotiation_clients"] - 1) * plan["calibration_examples"],
            max_tokens=64,
            seed=seed + 1,
            exclude=pool,
        )
        calib = [pool[: plan["calibration_examples"]]] + [
            others[i : i + plan["calibration_examples"]]
            for i in range(0, len(others), plan["calibration_examples"])
        ]
        k_max = max([c.budget or 1 for c in cells if c.method.startswith("shelora")] or [1])
        groups: dict[tuple, list[tuple[Cell, int]]] = {}
        for c, b in todo:
            groups.setdefault((*c.group, b), []).append((c, b))
        with path.open("a") as fh:
            for (rank, update, bs, lr, steps, b), items in groups.items():
                texts = pool[b * bs : (b + 1) * bs]
                y = labels[b * bs : (b + 1) * bs]
                batch = victim.batch(texts, max_length=int(plan["max_tokens"]) + 1)
                start = victim.start(rank, update)
                after = victim.train(
                    start,
                    batch,
                    y,
                    update=update,
                    lr=lr,
                    head_lr=float(plan.get("head_lr", 1e-3)),
                    local_steps=int(steps or plan.get("local_steps", 5)),
                    local_lr=float(plan.get("local_lr", 1e-3)),
                    seed=seed,
                )
                step_lr = items[0][0].step_lr or float(plan.get("local_lr", 1e-3))
                losses = None
                if update == "multistep-sgd":  # did the local SGD diverge on its own batch?
                    losses = (victim.loss(start, batch, y), victim.loss(after, batch, y))
                uploads: dict[tuple, tuple[bytes, bytes | None, float]] = {}
                for cell, _ in items:
                    rec = _measure(
                        cell,
                        b,
                        victim=victim,
                        public_model=public_model,
                        start=start,
                        after=after,
                        batch=batch,
                        texts=texts,
                        labels=y,
                        step_lr=step_lr,
                        columns=_columns_for(cell, victim, calib, k_max),
                        uploads=uploads,
                        seed=seed,
                        losses=losses,
                    )
                    line = json.dumps(rec)
                    fh.write(line + "\n")
                    fh.flush()
                    done[(cell.key, b)] = json.loads(line)  # as a resumed run reads it
                    bar.update(1)
    bar.close()
    return [done[(c.key, b)] for c in cells for b in range(n_batches) if (c.key, b) in done]


def _columns_for(cell: Cell, victim: Victim, calib: Sequence[Sequence[str]], k_max: int):
    if not cell.method.startswith("shelora"):
        return None
    return victim.columns(cell.rank, k_max, calib)


def _measure(
    cell: Cell,
    b: int,
    *,
    victim: Victim,
    public_model: Any,
    start: AdapterWeights,
    after: AdapterWeights,
    batch: Mapping[str, torch.Tensor],
    texts: Sequence[str],
    labels: Sequence[int],
    step_lr: float,
    columns: Mapping[str, Sequence[int]] | None,
    uploads: dict,
    seed: int,
    losses: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Upload (cached per method variant and batch), server view, attack, scores: one record.

    ``losses``: the batch's training loss before and after the local steps (multi-step SGD).
    A local SGD that raised it has diverged: the record says so (``diverged``). A multi-step
    SGD can also blow the adapter's weights up while the loss still falls; a SHE-LoRA upload
    refuses values outside its CKKS range either way, and that is recorded as nothing uploaded
    (``refused``, ROUGE 0, ``note`` says why) instead of stopping the grid. Outside multi-step
    SGD a refused upload is an error.
    """
    t0 = time.perf_counter()
    diverged = losses is not None and not (math.isfinite(losses[1]) and losses[1] <= losses[0])
    ukey = (cell.method, cell.budget, cell.dp_sigma, cell.dp_epsilon)
    if ukey not in uploads:
        try:
            uploads[ukey] = _upload(
                cell, b, victim, after, start, batch, labels, columns, step_lr, seed
            )
        except CKKSError as exc:
            if losses is None:
                raise
            uploads[ukey] = exc
    rec: dict[str, Any] = {"key": cell.key, "batch": b, **asdict(cell)}
    if losses is not None:
        rec.update(
            loss_start=losses[0],
            loss_end=losses[1],
            diverged=diverged,
            refused=isinstance(uploads[ukey], CKKSError),
        )
    if isinstance(uploads[ukey], CKKSError):
        return _refused(rec, uploads[ukey], texts, t0)
    data, consensus, client_s = uploads[ukey]
    knowledge = server_knowledge(
        cell.method,
        start,
        update=cell.update,
        lr=step_lr,
        bos_id=int(victim.tokenizer.bos_token_id),
        batch_size=cell.batch_size,
        columns=columns,
        budget=cell.budget or 0,
        consensus=consensus,
    )
    server_crypto = victim.server_crypto(cell.method)
    if cell.attacker == OPTIMISATION:
        return _measure_optimisation(
            rec,
            cell,
            b,
            data=data,
            knowledge=knowledge,
            server_crypto=server_crypto,
            public_model=public_model,
            victim=victim,
            batch=batch,
            texts=texts,
            labels=labels,
            client_s=client_s,
            seed=seed,
            t0=t0,
        )
    res, view = attack_upload(
        data,
        method=cell.method,
        knowledge=knowledge,
        public_model=public_model,
        server_crypto=server_crypto,
        attacker=cell.attacker,
        max_length=int(batch["input_ids"].shape[1]) + 1,
        **({} if cell.span_tol is None else {"span_tol": cell.span_tol}),
    )
    tok = victim.tokenizer
    refs = list(texts)
    ids = batch["input_ids"][batch["attention_mask"].bool()].tolist()
    true_tokens = set(ids) - {tok.bos_token_id}
    hidden: dict[int, int] = {}
    rec["note"] = view.note
    rec["decrypt_error"] = (
        try_decrypt(server_crypto, view.ciphertexts) if view.ciphertexts else None
    )
    if res is None:
        recon: list[str] = []
        rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        prec = recall = 0.0
        r1 = r2 = None
    else:
        recon = [tok.decode(s) for s in res.sequences]
        rouge = score_reconstruction(recon, refs)
        prec, recall = _token_scores(res.tokens, true_tokens)
        r1, r2 = res.rank_layer1, res.rank_layer2
        rec["route"] = res.route
        obs_hidden = observed_update(view, knowledge, attacker=cell.attacker)
        hidden = {i: int(lu.hidden.size) for i, lu in obs_hidden.layers.items()}
        names = {layer_index(n): n for n in view.after.factors}
        rec["unknown_entries"] = {
            i: int(
                np.sum(view.unknown_a.get(names[i], 0))
                + np.sum(view.unknown_b.get(names[i], 0))
                + np.sum(knowledge.unknown_a.get(names[i], 0))
            )
            for i in (0, 1)
        }
    return _scored(
        rec, rouge, prec, recall, (r1, r2), hidden, view, client_s, true_tokens, recon, refs, t0
    )


def _measure_optimisation(
    rec: dict[str, Any],
    cell: Cell,
    b: int,
    *,
    data: bytes,
    knowledge: Any,
    server_crypto: Any,
    public_model: Any,
    victim: Victim,
    batch: Mapping[str, torch.Tensor],
    texts: Sequence[str],
    labels: Sequence[int],
    client_s: float,
    seed: int,
    t0: float,
) -> dict[str, Any]:
    """The optimisation attacker's record (:mod:`~shelora_core.attacks.optimisation`).

    Besides the scores every record has: ``iterations`` (Adam steps), ``refine_evaluations``,
    ``stopped`` (which cap ended it), ``opt_distance`` (matching distance of the decoded batch)
    and ``true_distance`` (the same distance of the TRUE batch: a diagnostic the attacker cannot
    compute, measuring how far the search got).
    """
    view = server_view(
        data, method=cell.method, server_crypto=server_crypto, consensus=knowledge.consensus
    )
    tok = victim.tokenizer
    settings = OptimisationSettings(
        max_iters=cell.opt_iters or OPT_ITERS,
        time_cap=cell.opt_seconds or OPT_SECONDS,
        seed=seed + b,
    )
    out = attack_view(
        view,
        knowledge,
        public_model,
        attention_mask=batch["attention_mask"],
        labels=labels,
        settings=settings,
        masking="adaptive",
        exclude=[int(tok.bos_token_id)],
    )
    refs = list(texts)
    ids = batch["input_ids"][batch["attention_mask"].bool()].tolist()
    true_tokens = set(ids) - {tok.bos_token_id}
    rec["note"] = (
        f"{view.note}; optimisation attack (gradient matching on every adapted layer, adaptive "
        "masking, labels and sentence lengths known)"
    )
    rec["decrypt_error"] = (
        try_decrypt(server_crypto, view.ciphertexts) if view.ciphertexts else None
    )
    if out is None:
        recon: list[str] = []
        rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        prec = recall = 0.0
        hidden: dict[int, int] = {}
    else:
        res, target = out
        recon = [tok.decode(s) for s in res.sequences]
        rouge = score_reconstruction(recon, refs)
        prec, recall = _token_scores(res.tokens, true_tokens)
        hidden = {i: int((~target.mask_a[i]).any(0).sum()) for i in (0, 1)}
        rec.update(
            route=OPTIMISATION,
            iterations=res.iterations,
            refine_evaluations=res.refine_evaluations,
            stopped=res.stopped,
            opt_distance=res.distance,
            opt_continuous_distance=res.continuous_distance,
            opt_history=res.history,
            attack_only_seconds=res.seconds,
            true_distance=matching_distance(
                public_model,
                target,
                batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=labels,
                head=knowledge.start.head,
            ),
        )
    return _scored(
        rec, rouge, prec, recall, (None, None), hidden, view, client_s, true_tokens, recon, refs, t0
    )


def _scored(rec, rouge, prec, recall, ranks, hidden, view, client_s, true_tokens, recon, refs, t0):
    """``rec`` with a cell's scores, costs and examples (every attacker records the same fields)."""
    rec.update(
        rouge1=rouge["rouge1"],
        rouge2=rouge["rouge2"],
        rougeL=rouge["rougeL"],
        token_precision=prec,
        token_recall=recall,
        rank_layer1=ranks[0],
        rank_layer2=ranks[1],
        hidden_columns=hidden,
        upload_bytes=view.upload_bytes,
        ciphertexts=len(view.ciphertexts),
        client_seconds=client_s,
        distinct_tokens=len(true_tokens),
        examples=[
            {"reference": r, "reconstruction": p}
            for r, p in zip(refs, match_sentences(recon, refs), strict=True)
        ],
        seconds=time.perf_counter() - t0,
    )
    return rec


def _upload(cell, b, victim, after, start, batch, labels, columns, step_lr, seed):
    """The victim's upload for ``cell`` (:func:`~shelora_core.attacks.victim.client_upload`)."""
    return client_upload(
        cell.method,
        victim,
        after,
        start,
        batch=batch,
        labels=labels,
        budget=cell.budget or 0,
        columns=columns,
        dp_sigma=cell.dp_sigma,
        dp_epsilon=cell.dp_epsilon,
        lr=step_lr,
        seed=seed + b,
    )


def _refused(
    rec: dict[str, Any], exc: Exception, texts: Sequence[str], t0: float
) -> dict[str, Any]:
    """The record of a local update whose upload the method refused: nothing to attack."""
    rec.update(
        note=f"nothing uploaded: the method refused the local update ({exc})",
        decrypt_error=None,
        rouge1=0.0,
        rouge2=0.0,
        rougeL=0.0,
        token_precision=0.0,
        token_recall=0.0,
        rank_layer1=None,
        rank_layer2=None,
        hidden_columns={},
        upload_bytes=0,
        ciphertexts=0,
        client_seconds=0.0,
        distinct_tokens=None,
        examples=[{"reference": r, "reconstruction": ""} for r in texts],
        seconds=time.perf_counter() - t0,
    )
    return rec


def summarize(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Average per-batch records into table rows (one per cell), in first-seen order."""
    by: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by.setdefault(r["key"], []).append(r)
    rows = []
    for recs in by.values():
        r0 = recs[0]
        row = {
            k: r0[k]
            for k in (
                "method",
                "attacker",
                "batch_size",
                "rank",
                "budget",
                "update",
                "dp_sigma",
                "dp_epsilon",
                "lr",
            )
        }
        row["steps"] = r0.get("steps")
        row["span_tol"] = r0.get("span_tol")
        if "diverged" in r0:  # multi-step SGD: batches whose local SGD raised its own loss,
            # and whose upload the method refused (out of its CKKS range)
            row["diverged_batches"] = sum(bool(r["diverged"]) for r in recs)
            row["refused_batches"] = sum(bool(r.get("refused")) for r in recs)
        for k in ("rouge1", "rouge2", "rougeL", "token_precision", "token_recall"):
            row[k] = float(np.mean([r[k] for r in recs]))
        row["n_batches"] = len(recs)
        row["upload_bytes"] = float(np.mean([r["upload_bytes"] for r in recs]))
        row["ciphertexts"] = int(r0["ciphertexts"])
        row["client_seconds"] = float(np.mean([r["client_seconds"] for r in recs]))
        row["attack_seconds"] = float(np.mean([r["seconds"] for r in recs]))
        row["note"] = r0.get("note", "")
        if r0.get("decrypt_error"):
            row["decrypt_error"] = r0["decrypt_error"]
        row["examples"] = r0["examples"]
        rows.append(row)
    return rows


#: plan settings a notebook override may replace, and the cell fields it may filter on
_SETTINGS = ("n_batches", "max_tokens", "negotiation_clients", "calibration_examples")
_FILTERS = {
    "batch_sizes": "batch_size",
    "ranks": "rank",
    "updates": "update",
    "methods": "method",
    "attackers": "attacker",
}
#: caps on the optimisation attacker's cells (the smaller of the cell's own and this)
_CAPS = ("opt_iters", "opt_seconds")


def apply_overrides(
    plan: Mapping[str, Any], overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """``plan`` with ``overrides`` applied, and the override keys it does not know.

    Settings (``n_batches``, ``max_tokens``, ``negotiation_clients``, ``calibration_examples``) are
    replaced; ``batch_sizes``, ``ranks``, ``updates``, ``methods`` and ``attackers`` keep only the
    matching cells (e.g. ``{"batch_sizes": [1]}`` for a smoke test); ``opt_iters`` and
    ``opt_seconds`` cap the optimisation attacker's steps and seconds per batch (a capped cell is
    a cell of its own: it is not read back from an uncapped record).
    """
    out = dict(plan)
    ignored = []
    for key, value in overrides.items():
        if key in _SETTINGS:
            out[key] = int(value)
        elif key in _FILTERS:
            keep = set(value if isinstance(value, (list, tuple)) else [value])
            out["cells"] = [c for c in out["cells"] if getattr(c, _FILTERS[key]) in keep]
        elif key in _CAPS:
            cap = float(value) if key == "opt_seconds" else int(value)
            if not cap > 0:
                raise ValueError(f"{key}={value!r}: the cap must be positive")
            out["cells"] = [
                replace(c, **{key: cap if getattr(c, key) is None else min(getattr(c, key), cap)})
                if c.attacker == OPTIMISATION
                else c
                for c in out["cells"]
            ]
        else:
            ignored.append(key)
    if not out["cells"]:
        raise ValueError(f"the overrides {dict(overrides)} leave no cell of the attack grid")
    return out, ignored
