"""Privacy accounting of the DP methods over a whole run: Opacus's RDP accountant.

The DP methods (``flexlora-dp``, ``shelora-dp``) clip each client's round update to L2 norm
``C = cfg.dp_clip`` and add ``N(0, (sigma C)^2)`` to every coordinate before it leaves the client
(:mod:`shelora_core.privacy`). This module turns ``(sigma, sampling rate, rounds, delta)`` into the
epsilon the run spends, and back (the ``sigma`` for a target epsilon over the run).

**Unit of privacy: a client.** One release is a client's *whole* update of a round (every value
the method clips, as one vector), so the guarantee is client-level: it covers everything the
client's data changes in what it uploads, not one example. Adjacency is add/remove (the update
against no update, i.e. the zero update; L2 sensitivity ``C``), as in DP-FedAvg (McMahan et al.,
ICLR 2018). Under substitution (one client's data replaced by anything) the sensitivity is ``2C``:
evaluate :func:`rdp_epsilon` at ``sigma / 2``.

**The accountant.** Rényi DP of the (subsampled) Gaussian mechanism (Mironov, CSF 2017; Mironov,
Talwar and Zhang 2019) composed over the rounds and converted to ``(epsilon, delta)`` with Balle
et al. (AISTATS 2020, Thm 21), as Opacus 1.6 computes it (``opacus.accountants.analysis.rdp``;
imported lazily: Opacus imports torch, and the server side of the package must not).

**Two views, two numbers** (:func:`run_privacy` records both):

* ``epsilon``: the sampling rate is ``q = clients_per_round / num_clients`` and the steps are the
  rounds run: a client's privacy against an observer who does not know which clients took part in
  which round (e.g. of the broadcast plaintext aggregates, for ``flexlora-dp`` the released
  model). Opacus's analysis assumes Poisson sampling (each client independently with probability
  q); the server samples a fixed-size subset uniformly without replacement
  (:func:`shelora_core.server.sample_clients`), the usual approximation of DP-FedAvg, not a proof.
  With ``client_fraction = 1`` (q = 1) there is no subsampling and the number is exact.
* ``epsilon_server``: against the server, which samples the clients and sees who uploads:
  amplification by subsampling does not hold against it, so ``q = 1`` over the rounds the
  client was actually asked to train (the largest count over clients; sampling is seeded and
  public). This is the guarantee against the package's attacker (docs/design.md, "Threat
  model"), and the one a target epsilon (``cfg.dp_target_epsilon``) is calibrated to, so both
  numbers stay below the target.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Any

from .errors import ConfigError
from .privacy import gaussian_sigma

__all__ = [
    "ACCOUNTANT",
    "DP_METHODS",
    "RDP_ORDERS",
    "client_participations",
    "dp_noise_multiplier",
    "noise_multiplier_for",
    "rdp_epsilon",
    "run_privacy",
]

#: what :func:`run_privacy` names as its accountant
ACCOUNTANT = "opacus-1.6 RDP (subsampled Gaussian, Balle et al. 2020 conversion)"
#: methods whose clients clip and noise their uploads (the ``dp_*`` fields of the config)
DP_METHODS = ("flexlora-dp", "shelora-dp")
#: Rényi orders the accountant optimises over: Opacus's default grid extended towards 1 (large
#: epsilons, e.g. sigma < 1 over many rounds, are best at orders close to 1) and upwards (small
#: epsilons, large sigma)
RDP_ORDERS: tuple[float, ...] = (
    *(1 + x / 100.0 for x in range(1, 10)),
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(11, 64),
    *range(64, 513, 16),
)


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    if not (isinstance(noise_multiplier, numbers.Real) and noise_multiplier >= 0):
        raise ConfigError(
            f"noise_multiplier = {noise_multiplier!r} is invalid: must be a number >= 0 (the "
            "noise std per unit of the clipping norm)"
        )
    if not 0 < sample_rate <= 1:
        raise ConfigError(
            f"sample_rate = {sample_rate!r} is invalid: must be in (0, 1] (clients sampled per "
            "round / clients)"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps = {steps!r} is invalid: must be an integer >= 0 (rounds run)")
    if not 0 < delta < 1:
        raise ConfigError(f"delta = {delta!r} is invalid: must be in (0, 1), e.g. 1e-5")


@functools.lru_cache(maxsize=4096)
def rdp_epsilon(noise_multiplier: float, *, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon spent by ``steps`` releases of the subsampled Gaussian mechanism at ``delta``.

    Args:
        noise_multiplier: noise std per unit of L2 sensitivity (``sigma``).
        sample_rate: probability that a client takes part in a round (1: every round).
        steps: releases composed (rounds).
        delta: the target delta.

    Returns:
        The accounted epsilon (0 for no step, ``inf`` for ``sigma = 0``).

    Raises:
        ConfigError: a value out of range, naming it.
    """
    _check(noise_multiplier, sample_rate, steps, delta)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants.analysis import rdp as analysis

    rdp = analysis.compute_rdp(
        q=float(sample_rate), noise_multiplier=float(noise_multiplier), steps=int(steps),
        orders=list(RDP_ORDERS),
    )  # fmt: skip
    with warnings.catch_warnings():  # "optimal order is the smallest/largest alpha": see below
        warnings.simplefilter("ignore")
        eps, _ = analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=float(delta))
    return float(eps)


@functools.lru_cache(maxsize=1024)
def noise_multiplier_for(
    target_epsilon: float, *, sample_rate: float, steps: int, delta: float, rtol: float = 1e-4
) -> float:
    """The smallest noise multiplier (within ``rtol``) whose :func:`rdp_epsilon` is at most
    ``target_epsilon`` after ``steps`` rounds; the value returned always meets the target.

    Raises:
        ConfigError: a target <= 0, or another value out of range.
    """
    if not (isinstance(target_epsilon, numbers.Real) and math.isfinite(target_epsilon)):
        raise ConfigError(f"target_epsilon = {target_epsilon!r} is invalid: give a finite number")
    if target_epsilon <= 0:
        raise ConfigError(
            f"target_epsilon = {target_epsilon!r} is invalid: must be > 0 (epsilon over the run)"
        )
    _check(1.0, sample_rate, steps, delta)
    if steps == 0:
        return 0.0

    def eps(s: float) -> float:
        return rdp_epsilon(s, sample_rate=sample_rate, steps=steps, delta=delta)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            raise ConfigError(
                f"target_epsilon = {target_epsilon!r} is unreachable over {steps} rounds at "
                f"delta {delta}: raise the target or run fewer rounds"
            )
    while hi - lo > rtol * hi:  # eps decreases in sigma
        mid = 0.5 * (lo + hi)
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def client_participations(cfg: Any, rounds: int | None = None) -> int:
    """The most rounds any client is asked to train in rounds ``1 .. rounds`` (default
    ``cfg.rounds``), from the server's seeded sampling (public)."""
    from .server import sample_clients

    rounds = cfg.rounds if rounds is None else int(rounds)
    if cfg.clients_per_round >= cfg.num_clients:
        return rounds
    counts = [0] * cfg.num_clients
    for rnd in range(1, rounds + 1):
        for cid in sample_clients(cfg, rnd):
            counts[cid] += 1
    return max(counts)


def dp_noise_multiplier(cfg: Any) -> float:
    """The noise multiplier a DP method's clients use, from the config, first rule that applies:

    1. ``dp_noise_multiplier`` when set;
    2. ``dp_target_epsilon`` when set: :func:`noise_multiplier_for` over the run, against the
       server (``q = 1`` over :func:`client_participations` of ``cfg.rounds``), at ``dp_delta``;
    3. the per-round analytic Gaussian mechanism for ``(dp_epsilon, dp_delta)``
       (:func:`~shelora_core.privacy.gaussian_sigma`; the run then spends more, see
       :func:`run_privacy`).
    """
    if cfg.dp_noise_multiplier is not None:
        return float(cfg.dp_noise_multiplier)
    if cfg.dp_target_epsilon is not None:
        return noise_multiplier_for(
            float(cfg.dp_target_epsilon),
            sample_rate=1.0,
            steps=client_participations(cfg),
            delta=float(cfg.dp_delta),
        )
    return gaussian_sigma(float(cfg.dp_epsilon), float(cfg.dp_delta))


def run_privacy(cfg: Any, rounds_run: int) -> dict[str, Any] | None:
    """What a DP run has spent after ``rounds_run`` rounds (``None`` for other methods): the
    record every round and the summary of a DP run carry (see the module docstring). The
    epsilons are ``None`` when the noise multiplier is 0 (no guarantee; JSON has no infinity)."""
    if cfg.method not in DP_METHODS:
        return None
    sigma = dp_noise_multiplier(cfg)
    delta = float(cfg.dp_delta)
    q = cfg.clients_per_round / cfg.num_clients
    taken = client_participations(cfg, rounds_run)
    if cfg.dp_noise_multiplier is not None:
        calibration = "noise_multiplier"
    elif cfg.dp_target_epsilon is not None:
        calibration = "target_epsilon"
    else:
        calibration = "per_round_analytic"
    eps = rdp_epsilon(sigma, sample_rate=q, steps=int(rounds_run), delta=delta)
    eps_server = rdp_epsilon(sigma, sample_rate=1.0, steps=taken, delta=delta)
    return {
        "unit": "client-level: a client's whole clipped round update (add/remove adjacency)",
        "covers": (
            "the whole upload"
            if cfg.method == "flexlora-dp"
            else "the plaintext part of the upload only (B, the visible columns of A, the head)"
        ),
        "accountant": ACCOUNTANT,
        "calibration": calibration,
        "noise_multiplier": sigma,
        "clip": float(cfg.dp_clip),
        "delta": delta,
        "rounds": int(rounds_run),
        "sample_rate": q,
        "epsilon": eps if math.isfinite(eps) else None,  # None: no noise, no guarantee
        "participations": taken,
        "epsilon_server": eps_server if math.isfinite(eps_server) else None,
    }
