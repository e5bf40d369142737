"""Server-side negotiation of the ordered list of LoRA columns to encrypt, on OPE ciphertexts only.

SHE-LoRA (Liu et al., "SHE-LoRA: Selective Homomorphic Encryption for Federated Tuning with
Heterogeneous LoRA", ICLR 2026), step 3 of the protocol (docs/design.md, "One round on the wire"). Each client sends,
per layer, its top-k_i columns as ``(index_ciphertext, score_ciphertext)`` pairs, encrypted by the
clients with a keyed order-preserving scheme (Boldyreva et al., EUROCRYPT 2009; client side in
:mod:`shelora_core.ope`). The server holds no OPE key and this module never imports the OPE
module: ciphertexts are plain Python integers here. Deterministic OPE makes equal columns equal
integers across clients, and order-preserving OPE makes max / min / sorting meaningful; sums and
differences of ciphertexts are meaningless, so nothing below adds scores.

Output: ONE ORDERED list ``G`` of index ciphertexts per layer, of length ``k_max = max_i k_i``;
client i encrypts its prefix ``J_i = G[:k_i]``. Prefixes nest, so the CKKS ciphertext width is
``k_max``, and a client that drops out after the negotiation leaves every other prefix unchanged
(:meth:`NegotiationResult.without`). The list is never turned into a set (the authors' code does,
and loses the order).

Definitions (per layer; clients with budget 0 send plaintext only and take no part):

* ``P_i``: client i's *target*, its first ``min(k_i, |items|)`` proposed columns (its top-k_i).
  Items beyond the budget are accepted as extra candidates for the ranked lists.
* Ranked lists (all orders deterministic; ciphertexts compare like plaintexts):

  - **Common**: every proposed column, by the number of clients that proposed it (descending),
    ties by its max score ciphertext (descending), then by index ciphertext (ascending).
  - **Sensitivity**: every proposed column, by max score ciphertext (descending), ties by index
    ciphertext (ascending).
  - **Clients[t]** for budget tier t (the clients whose budget is ``b_t``): the columns those
    clients proposed, by their min score ciphertext over those clients (descending), ties by the
    best position in their proposals (ascending), then by index ciphertext (ascending). With one
    client this is its proposal order, so a single client gets ``G`` equal to its proposal.

* Tiers: distinct positive budgets ``b_1 < b_2 < ...``; tier t appends ``d_t = b_t - b_(t-1)``
  columns (``b_0 = 0``).
* Fraction rounding: for a tier adding ``d`` columns with fractions ``(a, b)``, ``a, b >= 0``,
  ``a + b <= 1``, the quotas are, cumulatively and rounding half up,
  ``n_T = floor(a d + 1/2)``, ``n_T + n_C = floor((a + b) d + 1/2)``,
  ``n_S = d - n_T - n_C`` (a 1e-9 tolerance absorbs float error such as ``0.7 + 0.2 < 0.9``);
  the three always sum to ``d`` (:func:`split_counts`).
* Filling: take ``n_T`` new columns from Clients[t], then ``n_C`` from Common, then ``n_S`` from
  Sensitivity, skipping columns already in ``G``; a list that runs out passes its unfilled quota
  to the next one (Clients[t] -> Common -> Sensitivity -> filler). Within a tier the columns are
  appended in that order.
* Coverage: ``Coverage_i = |G[:k_i] & P_i| / |P_i|`` (1 when ``P_i`` is empty). This is
  The paper's ``|Res & G_i| / |G_i|`` measured on the columns client i will actually encrypt:
  for the current tier's clients ``G[:k_i]`` is the list built so far; clients of earlier tiers
  keep the coverage of their own (already fixed) prefix, since columns appended later are not
  encrypted by them.
* Risk: the server cannot add OPE scores, so the uncovered part of a proposal is weighted by
  position (client i ranked its proposal by score) and by rank:
  ``Risk_i = (r_i / r_max) * sum_{p < |P_i|, P_i[p] not in G[:k_i]} w_p`` with linearly decreasing
  position weights ``w_p = 2 (|P_i| - p) / (|P_i| (|P_i| + 1))`` (they sum to 1; the top column
  weighs most) and ``r_max`` the largest rank among the layer's participating clients. So
  ``0 <= Risk_i <= r_i / r_max`` and ``Risk_i = 0`` when ``Coverage_i = 1``.
* Choice of (a, b) per tier, greedily in ascending budget: maximise
  ``objective = min_i Coverage_i - max_i Risk_i`` over the clients of tiers ``1..t`` ("seen so
  far"). Ties are broken by the same objective restricted to the tier's own clients (earlier
  tiers' constant values can mask the current choice), then by larger ``a``, then larger ``b``.
  ``search="grid"`` evaluates every point of the simplex grid with step ``grid_step`` (66 points at
  0.1); when ``d_t <= 1 / grid_step`` the grid reaches every integer split, so it is exhaustive
  and no random sample can beat it. ``search="random"`` evaluates ``samples`` uniform points of
  the simplex (Dirichlet(1, 1, 1)), to compare.

Inputs the server refuses (:class:`NegotiationError`, a ``ValueError``): a client listing the same
index ciphertext twice (a malformed proposal: deterministic OPE means the same column; it is an
error rather than silently deduplicated, because deduplicating would shrink the client's target);
score ciphertexts that increase along a proposal (the proposal order must be most sensitive
first); a repeated client id in a layer; a budget larger than the (public) layer width when
``widths`` is given; and a layer whose proposals hold fewer than ``k_max`` distinct columns.

Limitation: the server cannot invent column ciphertexts (it does not hold the OPE key), so ``G``
is filled from the proposals only. If their union is smaller than ``k_max`` (possible only when
some client proposes fewer columns than its budget), either clients must propose at least their
budget, or they pass ``filler``: index ciphertexts, encrypted by the clients (e.g. of a public
column order), appended when all proposals are used. The index ciphertext of column j is the same
in every layer, so one filler list can serve all layers; a per-layer mapping is also accepted.
"""

from __future__ import annotations

import math
import operator
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import SheloraError

__all__ = [
    "ClientProposal",
    "NegotiationError",
    "NegotiationResult",
    "RankedLists",
    "TierChoice",
    "grid_points",
    "negotiate",
    "random_points",
    "ranked_lists",
    "split_counts",
]

_TOL = 1e-9
SOURCES = ("clients", "common", "sensitivity", "filler")
"""Where a tier's columns come from, in fill order."""


class NegotiationError(SheloraError, ValueError):
    """Proposals from which no valid ordered column list can be built; the message says why."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def _int(x: Any, what: str) -> int:
    try:
        return operator.index(x)
    except TypeError:
        raise NegotiationError(f"{what} must be an integer, got {x!r}") from None


@dataclass
class ClientProposal:
    """One client's proposal for one layer, as the server receives it.

    Attributes:
        client_id: the client's identifier (unique within a layer).
        rank: the client's LoRA rank ``r_i`` (public), >= 1.
        budget: its HE budget ``k_i`` for this layer (public), >= 0; 0 = plaintext only.
        items: ``(index_ciphertext, score_ciphertext)`` pairs, most sensitive first (score
            ciphertexts non-increasing), distinct index ciphertexts. Normally ``budget`` pairs.

    Raises:
        NegotiationError: on a negative budget, a rank below 1, a repeated index ciphertext or
            score ciphertexts that increase along the list.
    """

    client_id: str
    rank: int
    budget: int
    items: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.client_id, str) or not self.client_id:
            raise NegotiationError(f"client_id must be a non-empty str, got {self.client_id!r}")
        self.rank = _int(self.rank, f"client {self.client_id!r} rank")
        self.budget = _int(self.budget, f"client {self.client_id!r} budget")
        if self.rank < 1:
            raise NegotiationError(f"client {self.client_id!r}: rank must be >= 1, got {self.rank}")
        if self.budget < 0:
            raise NegotiationError(
                f"client {self.client_id!r}: budget must be >= 0, got {self.budget}"
            )
        items: list[tuple[int, int]] = []
        for item in self.items:
            if len(item) != 2:
                raise NegotiationError(
                    f"client {self.client_id!r}: items are (index_ciphertext, score_ciphertext) "
                    f"pairs, got {item!r}"
                )
            items.append((_int(item[0], "index ciphertext"), _int(item[1], "score ciphertext")))
        seen: set[int] = set()
        for pos, (c, s) in enumerate(items):
            if c in seen:
                raise NegotiationError(
                    f"client {self.client_id!r} proposes index ciphertext {c} twice (position "
                    f"{pos}): a proposal lists distinct columns; fix the client's top-k"
                )
            seen.add(c)
            if pos and s > items[pos - 1][1]:
                raise NegotiationError(
                    f"client {self.client_id!r}: score ciphertexts must be non-increasing along "
                    f"the proposal (most sensitive first), but position {pos} has {s} > "
                    f"{items[pos - 1][1]}"
                )
        self.items = items

    @property
    def indices(self) -> list[int]:
        """The proposed index ciphertexts, in proposal order."""
        return [c for c, _ in self.items]

    @property
    def target(self) -> list[int]:
        """``P_i``: the first ``min(budget, len(items))`` index ciphertexts."""
        return [c for c, _ in self.items[: self.budget]]


# --------------------------------------------------------------------------------------------
# Ranked lists, rounding, candidate points
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankedLists:
    """The three ranked lists of one layer (index ciphertexts, best first).

    Attributes:
        common: by proposal count, then max score, then ciphertext.
        sensitivity: by max score, then ciphertext.
        tiers: budget ``b_t`` -> that tier's Clients list (by min score over the tier's clients).
        counts: index ciphertext -> number of clients that proposed it.
    """

    common: tuple[int, ...]
    sensitivity: tuple[int, ...]
    tiers: dict[int, tuple[int, ...]]
    counts: dict[int, int]


def ranked_lists(proposals: Sequence[ClientProposal]) -> RankedLists:
    """Build Common, Sensitivity and per-tier Clients lists (clients with budget 0 ignored)."""
    active = [p for p in proposals if p.budget > 0]
    count: dict[int, int] = {}
    max_score: dict[int, int] = {}
    for p in active:
        for c, s in p.items:
            count[c] = count.get(c, 0) + 1
            max_score[c] = max(max_score.get(c, s), s)
    common = tuple(sorted(count, key=lambda c: (-count[c], -max_score[c], c)))
    sensitivity = tuple(sorted(count, key=lambda c: (-max_score[c], c)))
    tiers: dict[int, tuple[int, ...]] = {}
    for budget in sorted({p.budget for p in active}):
        min_score: dict[int, int] = {}
        best_pos: dict[int, int] = {}
        for p in active:
            if p.budget != budget:
                continue
            for pos, (c, s) in enumerate(p.items):
                min_score[c] = min(min_score.get(c, s), s)
                best_pos[c] = min(best_pos.get(c, pos), pos)
        tiers[budget] = tuple(sorted(min_score, key=lambda c: (-min_score[c], best_pos[c], c)))
    return RankedLists(common, sensitivity, tiers, count)


def split_counts(d: int, a: float, b: float) -> tuple[int, int, int]:
    """Quotas ``(n_T, n_C, n_S)`` of a tier adding ``d`` columns with fractions ``(a, b)``.

    Cumulative round-half-up: ``n_T = floor(a d + 1/2)``, ``n_T + n_C = floor((a + b) d + 1/2)``,
    ``n_S = d - n_T - n_C`` (with a 1e-9 tolerance for float error).

    Raises:
        ValueError: if ``a < 0``, ``b < 0`` or ``a + b > 1``.
    """
    if a < -_TOL or b < -_TOL or a + b > 1 + _TOL:
        raise ValueError(f"(a, b) = ({a}, {b}) is outside the simplex a, b >= 0, a + b <= 1")
    n_t = min(d, max(0, math.floor(a * d + 0.5 + _TOL)))
    n_tc = min(d, max(n_t, math.floor((a + b) * d + 0.5 + _TOL)))
    return n_t, n_tc - n_t, d - n_tc


def grid_points(step: float = 0.1) -> list[tuple[float, float]]:
    """Every ``(a, b)`` on the simplex grid ``{(i s, j s): i + j <= 1/s}``, larger ``a`` first.

    Raises:
        ValueError: if ``1 / step`` is not a whole number.
    """
    if not 0 < step <= 1:
        raise ValueError(f"grid_step must be in (0, 1], got {step}")
    m = round(1 / step)
    if abs(m * step - 1) > 1e-6:
        raise ValueError(f"grid_step={step} must divide 1 (e.g. 0.1, 0.05, 0.25)")
    return [(i / m, j / m) for i in range(m, -1, -1) for j in range(m - i, -1, -1)]


def random_points(
    samples: int, seed: int | Sequence[int] | np.random.Generator = 0
) -> list[tuple[float, float]]:
    """``samples`` points drawn uniformly from the simplex ``a, b >= 0, a + b <= 1``."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    u = rng.dirichlet(np.ones(3), size=samples)
    return [(float(x[0]), float(x[1])) for x in u]


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TierChoice:
    """What the search chose for one budget tier of one layer.

    Attributes:
        budget: the tier's budget ``b_t`` (length of ``G`` after the tier).
        added: columns the tier appended, ``b_t - b_(t-1)``.
        clients: ids of the tier's clients.
        a: fraction from the tier's Clients list.
        b: fraction from Common (the rest, ``1 - a - b``, from Sensitivity).
        objective: ``min Coverage - max Risk`` over the clients seen so far.
        tier_objective: the same over the tier's own clients (first tie-breaker).
        split: planned quotas ``(n_T, n_C, n_S)`` (:func:`split_counts`).
        taken: columns actually taken per source (see ``SOURCES``), after fall-through.
        grid: every evaluated ``(a, b)`` -> objective (the heat map).
    """

    budget: int
    added: int
    clients: tuple[str, ...]
    a: float
    b: float
    objective: float
    tier_objective: float
    split: tuple[int, int, int]
    taken: dict[str, int]
    grid: dict[tuple[float, float], float]


@dataclass
class NegotiationResult:
    """The negotiated column lists and how they were chosen.

    Attributes:
        columns: layer -> ordered index ciphertexts ``G`` (length = the layer's largest budget).
        tiers: layer -> one :class:`TierChoice` per budget tier, ascending.
        coverage: layer -> client -> ``Coverage_i`` (clients with budget 0 omitted).
        risk: layer -> client -> ``Risk_i`` (clients with budget 0 omitted).
        budgets: layer -> client -> ``k_i`` (all clients, 0 included).
        search: ``"grid"`` or ``"random"``.
        grid_step: grid step (grid search).
        samples: random points per tier (random search).
        seed: seed of the random search.
    """

    columns: dict[str, list[int]]
    tiers: dict[str, list[TierChoice]]
    coverage: dict[str, dict[str, float]]
    risk: dict[str, dict[str, float]]
    budgets: dict[str, dict[str, int]]
    search: str = "grid"
    grid_step: float = 0.1
    samples: int = 0
    seed: int = 0

    def prefix(self, layer: str, client_id: str) -> list[int]:
        """``J_i = G[:k_i]``: the index ciphertexts client ``client_id`` encrypts in ``layer``."""
        try:
            k = self.budgets[layer][client_id]
        except KeyError:
            raise KeyError(f"no client {client_id!r} in layer {layer!r}") from None
        return list(self.columns[layer][:k])

    def objective(self, layer: str) -> float:
        """Final ``min_i Coverage_i - max_i Risk_i`` over the layer's clients (NaN if none)."""
        cov, risk = self.coverage[layer], self.risk[layer]
        if not cov:
            return float("nan")
        return min(cov.values()) - max(risk.values())

    def objective_grid(
        self, layer: str, tier: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Heat-map arrays ``(a_values, b_values, Z)`` with ``Z[ib, ia]``; NaN off the simplex.

        Raises:
            ValueError: for a random search (its points are scattered: use ``TierChoice.grid``).
        """
        if self.search != "grid":
            raise ValueError("objective_grid needs search='grid'; use tiers[layer][t].grid")
        grid = self.tiers[layer][tier].grid
        m = round(1 / self.grid_step)
        axis = np.arange(m + 1) / m
        z = np.full((m + 1, m + 1), np.nan)
        for (a, b), v in grid.items():
            z[round(b * m), round(a * m)] = v
        return axis, axis.copy(), z

    def without(self, client_ids: Iterable[str]) -> NegotiationResult:
        """The lists after clients drop out between negotiation and training.

        Nothing is renegotiated: each layer's list is truncated to the largest remaining budget,
        so every remaining client's prefix is unchanged. ``tiers`` keeps the negotiation record.
        """
        drop = set(client_ids)
        budgets = {
            layer: {c: k for c, k in bud.items() if c not in drop}
            for layer, bud in self.budgets.items()
        }
        columns = {
            layer: list(cols[: max(budgets[layer].values(), default=0)])
            for layer, cols in self.columns.items()
        }
        return NegotiationResult(
            columns=columns,
            tiers=self.tiers,
            coverage={
                lay: {c: v for c, v in d.items() if c not in drop}
                for lay, d in self.coverage.items()
            },
            risk={
                lay: {c: v for c, v in d.items() if c not in drop} for lay, d in self.risk.items()
            },
            budgets=budgets,
            search=self.search,
            grid_step=self.grid_step,
            samples=self.samples,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (ciphertexts as ints, grids as lists of records)."""
        return {
            "search": self.search,
            "grid_step": self.grid_step,
            "samples": self.samples,
            "seed": self.seed,
            "columns": {k: list(v) for k, v in self.columns.items()},
            "budgets": self.budgets,
            "coverage": self.coverage,
            "risk": self.risk,
            "tiers": {
                layer: [
                    {
                        "budget": t.budget,
                        "added": t.added,
                        "clients": list(t.clients),
                        "a": t.a,
                        "b": t.b,
                        "objective": t.objective,
                        "tier_objective": t.tier_objective,
                        "split": list(t.split),
                        "taken": dict(t.taken),
                        "grid": [{"a": a, "b": b, "objective": v} for (a, b), v in t.grid.items()],
                    }
                    for t in tiers
                ]
                for layer, tiers in self.tiers.items()
            },
        }


# --------------------------------------------------------------------------------------------
# The negotiation
# --------------------------------------------------------------------------------------------
def _coverage_risk(
    target: Sequence[int], encrypted: set[int], rank: int, r_max: int
) -> tuple[float, float]:
    n = len(target)
    if n == 0:
        return 1.0, 0.0
    hit = [c in encrypted for c in target]
    uncovered = sum(n - p for p, ok in enumerate(hit) if not ok) / (n * (n + 1) / 2)
    return sum(hit) / n, rank / r_max * uncovered


def _fill(
    used: set[int], d: int, split: tuple[int, int, int], sources: Sequence[Sequence[int]]
) -> tuple[list[int], dict[str, int]]:
    """Append ``d`` new columns following the quotas, with fall-through to the next source."""
    taken_set = set(used)
    new: list[int] = []
    taken: dict[str, int] = {}
    carry = 0
    for name, quota, source in zip(SOURCES, (*split, 0), sources, strict=True):
        want, got = quota + carry, 0
        for c in source:
            if got == want:
                break
            if c not in taken_set:
                taken_set.add(c)
                new.append(c)
                got += 1
        taken[name] = got
        carry = want - got
    if carry:  # unreachable after the union check in negotiate()
        raise NegotiationError(f"ran out of columns: {carry} of {d} missing")
    return new, taken


def _check_layer(
    layer: str,
    props: Sequence[ClientProposal],
    width: int | None,
    filler: Sequence[int],
    lists: RankedLists,
) -> None:
    ids = [p.client_id for p in props]
    dup = sorted({c for c in ids if ids.count(c) > 1})
    if dup:
        raise NegotiationError(f"layer {layer!r}: client ids {dup} appear more than once")
    if width is not None:
        for p in props:
            if p.budget > width:
                raise NegotiationError(
                    f"layer {layer!r}: client {p.client_id!r} has budget {p.budget} but the layer "
                    f"has only {width} columns; lower its HE budget to at most {width}"
                )
        if len(lists.common) > width:
            raise NegotiationError(
                f"layer {layer!r}: the proposals hold {len(lists.common)} distinct index "
                f"ciphertexts but the layer has {width} columns: clients used different OPE keys "
                "or mixed up layers"
            )
    active = [p for p in props if p.budget > 0]
    if not active:
        return
    top = max(active, key=lambda p: p.budget)
    avail = len(set(lists.common) | set(filler))
    if avail < top.budget:
        raise NegotiationError(
            f"layer {layer!r}: the proposals{' and filler' if filler else ''} hold only {avail} "
            f"distinct columns but client {top.client_id!r} has budget {top.budget}. The server "
            "cannot invent column ciphertexts (it does not hold the OPE key): each client must "
            "propose at least its budget (its top-k_i), or the clients must pass filler= index "
            "ciphertexts (e.g. of a public column order)"
        )


def negotiate(
    proposals: Mapping[str, Sequence[ClientProposal]],
    *,
    grid_step: float = 0.1,
    search: str = "grid",
    seed: int = 0,
    samples: int = 66,
    widths: Mapping[str, int] | None = None,
    filler: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
) -> NegotiationResult:
    """Negotiate one ordered list of index ciphertexts per layer (see the module docstring).

    Args:
        proposals: layer -> one :class:`ClientProposal` per client (ciphertexts only).
        grid_step: step of the ``(a, b)`` simplex grid for ``search="grid"``. Defaults to 0.1.
        search: ``"grid"`` (exhaustive on the grid) or ``"random"`` (``samples`` uniform points
            per tier, to compare).
        seed: seed of the random search (mixed with the layer name and the tier index).
        samples: points per tier for the random search. Defaults to 66 (the 0.1 grid's size).
        widths: optional layer -> number of columns (public), to validate the budgets.
        filler: optional index ciphertexts, encrypted by the clients, appended after every
            proposed column (one sequence for all layers or a per-layer mapping).

    Returns:
        The :class:`NegotiationResult`.

    Raises:
        NegotiationError: on an invalid proposal, a budget above the layer width or too few
            distinct columns to fill the list.
    """
    if search not in ("grid", "random"):
        raise ValueError(f"search must be 'grid' or 'random', got {search!r}")
    points = grid_points(grid_step) if search == "grid" else None
    result = NegotiationResult(
        columns={},
        tiers={},
        coverage={},
        risk={},
        budgets={},
        search=search,
        grid_step=grid_step,
        samples=samples if search == "random" else 0,
        seed=seed,
    )
    for layer, layer_props in proposals.items():
        props = list(layer_props)
        for p in props:
            if not isinstance(p, ClientProposal):
                raise TypeError(f"layer {layer!r}: expected ClientProposal, got {type(p).__name__}")
        width: int | None = None
        if widths is not None:
            if layer not in widths:
                raise NegotiationError(f"widths has no entry for layer {layer!r}")
            width = int(widths[layer])
        if filler is None:
            layer_filler: list[int] = []
        elif isinstance(filler, Mapping):
            layer_filler = [_int(c, "filler") for c in filler.get(layer, ())]
        else:
            layer_filler = [_int(c, "filler") for c in filler]
        active = [p for p in props if p.budget > 0]
        lists = ranked_lists(active)
        _check_layer(layer, props, width, layer_filler, lists)
        result.budgets[layer] = {p.client_id: p.budget for p in props}

        r_max = max((p.rank for p in active), default=1)
        prefix: list[int] = []
        stats: dict[str, tuple[float, float]] = {}
        tiers: list[TierChoice] = []
        prev = 0
        for t, budget in enumerate(sorted({p.budget for p in active})):
            d = budget - prev
            tier_clients = [p for p in active if p.budget == budget]
            sources = (lists.tiers[budget], lists.common, lists.sensitivity, layer_filler)
            if points is None:
                rng = np.random.default_rng([seed, zlib.crc32(layer.encode()), t])
                cands = random_points(samples, rng)
            else:
                cands = points
            used = set(prefix)
            fixed_cov = [c for c, _ in stats.values()]
            fixed_risk = [r for _, r in stats.values()]
            cache: dict[tuple[int, int, int], Any] = {}
            grid: dict[tuple[float, float], float] = {}
            best: tuple[tuple[float, float, float, float], tuple[int, int, int]] | None = None
            for a, b in cands:
                split = split_counts(d, a, b)
                if split not in cache:
                    new, taken = _fill(used, d, split, sources)
                    enc = used | set(new)
                    tier_stats = {
                        p.client_id: _coverage_risk(p.target, enc, p.rank, r_max)
                        for p in tier_clients
                    }
                    covs = [c for c, _ in tier_stats.values()]
                    risks = [r for _, r in tier_stats.values()]
                    obj = min(fixed_cov + covs) - max(fixed_risk + risks)
                    tier_obj = min(covs) - max(risks)
                    cache[split] = (obj, tier_obj, new, taken, tier_stats)
                obj, tier_obj = cache[split][:2]
                grid[(a, b)] = obj
                key = (obj, tier_obj, a, b)
                if best is None or key > best[0]:
                    best = (key, split)
            assert best is not None
            (obj, tier_obj, a, b), split = best
            _, _, new, taken, tier_stats = cache[split]
            prefix.extend(new)
            stats.update(tier_stats)
            tiers.append(
                TierChoice(
                    budget=budget,
                    added=d,
                    clients=tuple(p.client_id for p in tier_clients),
                    a=a,
                    b=b,
                    objective=obj,
                    tier_objective=tier_obj,
                    split=split,
                    taken=taken,
                    grid=grid,
                )
            )
            prev = budget
        result.columns[layer] = prefix
        result.tiers[layer] = tiers
        result.coverage[layer] = {p.client_id: stats[p.client_id][0] for p in active}
        result.risk[layer] = {p.client_id: stats[p.client_id][1] for p in active}
    return result
