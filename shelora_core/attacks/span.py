"""DAGER's span check: is a layer input in the row space of the observed gradient?

The gradient of a linear layer ``y_t = W x_t`` is ``grad W = sum_t g_t x_t^T``, so its rows lie in
the span of the layer inputs ``x_t``; with fewer inputs than the width (n = 576 in SmolLM2) that
span is a proper subspace almost no other vector falls into (Petrov et al., "DAGER: Exact Gradient
Inversion for Large Language Models", NeurIPS 2024). :class:`SpanCheck` tests candidate inputs
against the span of one observed layer, through one of three routes:

- ``"grad_w"``, full fine-tuning: rows of ``grad W`` span ``{x_t}``;
- ``"grad_a"``, LoRA in later rounds (``B != 0``): ``grad A = s B^T grad W`` spans ``{x_t}`` too
  (rank <= r);
- ``"grad_b"``, LoRA in the first round (``B = 0`` so ``grad A = 0``): ``grad B = s grad W A^T``,
  whose rows lie in ``span{A x_t}`` (in R^r): test ``A x``. Only informative while the number of
  distinct inputs is below r.

Hidden columns (SHE-LoRA): the server does not see ``grad A[:, J]`` and does not know ``A[:, J]``
for the input features ``J``. Two attackers:

- ``"oblivious"``: runs the check as written on what it sees (zeros where columns are hidden);
- ``"adaptive"``: knows ``J`` (the negotiated column list is public to the server). For
  ``grad W`` / ``grad A`` it checks only the visible coordinates: rows of ``grad[:, V]`` span
  ``{x_t[V]}``, exactly. For ``grad B`` the unknown block ``A[:, J]`` adds ``A[:, J] x_J`` to every
  tested vector; with ``Q`` an orthonormal basis of the complement of the observed span, true
  inputs satisfy ``Q^T A_vis x_vis + N x_J = 0`` with the unknown ``N = Q^T A[:, J]``
  ((r - d) x k): a linear regression shared by the true inputs, fitted by trimmed least squares
  over the vocabulary (:meth:`SpanCheck.fit_offset`, first layer) or learned as a Gaussian
  posterior from the inputs accepted so far (:meth:`SpanCheck.fit_posterior`, second layer,
  where the candidates are prefixes, not a vocabulary). This needs more true inputs than hidden
  columns, so it fails more often with large k and one short sentence.

In this package the round-1 ``A`` is a public function of the configuration seed
(``LoraModel.init_weights``), so at round 1 the server knows ``A[:, J]`` anyway
(``hide_columns(..., hide_a=False)``); hiding it is the pessimistic case for the attacker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .gradients import LayerUpdate
from .options import ATTACKERS, ROUTES, _check_choice

__all__ = ["RowSpan", "SpanCheck", "row_span", "span_distances"]

_DT = torch.float64


@dataclass
class RowSpan:
    """An orthonormal basis of the row space of an observed gradient.

    Attributes:
        basis: (p, d) orthonormal columns, p = number of tested coordinates.
        singular_values: all singular values of the gradient, descending.
        rank: d, the number of singular values above ``rank_tol`` times the largest.
    """

    basis: torch.Tensor
    singular_values: torch.Tensor
    rank: int

    def complement(self) -> torch.Tensor:
        """An orthonormal basis (p, p - d) of the orthogonal complement of the span."""
        p, d = self.basis.shape
        if d == 0:
            return torch.eye(p, dtype=_DT)
        q, _ = torch.linalg.qr(self.basis, mode="complete")
        return q[:, d:]


def row_span(
    grad: np.ndarray | torch.Tensor, *, rank_tol: float = 1e-5, max_rank: int | None = None
) -> RowSpan:
    """Row space of ``grad`` through an SVD in float64.

    Args:
        grad: (rows, p) gradient.
        rank_tol: singular values below ``rank_tol * s_max`` count as zero.
        max_rank: keep at most this many directions.

    Returns:
        The :class:`RowSpan` (rank 0 for an all-zero gradient).
    """
    if not rank_tol > 0:
        raise ValueError(f"rank_tol must be > 0 (got {rank_tol})")
    g = torch.as_tensor(np.asarray(grad) if not torch.is_tensor(grad) else grad).to(_DT)
    if g.ndim != 2:
        raise ValueError(f"grad must be a matrix, got shape {tuple(g.shape)}")
    _, s, vh = torch.linalg.svd(g, full_matrices=False)
    top = float(s[0]) if s.numel() else 0.0
    d = int((s > rank_tol * top).sum()) if top > 0 else 0
    if max_rank is not None:
        d = min(d, max_rank)
    return RowSpan(basis=vh[:d].T.contiguous(), singular_values=s, rank=d)


def span_distances(z: torch.Tensor, span: RowSpan, *, chunk: int = 8192) -> torch.Tensor:
    """Relative distance ``||z - P z|| / ||z||`` of every row of ``z`` to the span (float64)."""
    z = z.to(_DT)
    out = torch.empty(z.shape[0], dtype=_DT)
    for lo in range(0, z.shape[0], chunk):
        block = z[lo : lo + chunk]
        res = block - (block @ span.basis) @ span.basis.T
        out[lo : lo + chunk] = res.norm(dim=1) / block.norm(dim=1).clamp_min(1e-300)
    return out


class SpanCheck:
    """The span check of one observed layer, as a given attacker runs it.

    Args:
        update: the layer's observed update.
        attacker: ``"oblivious"`` or ``"adaptive"`` (see the module docstring).
        route: ``"grad_w"``, ``"grad_a"``, ``"grad_b"`` or ``"auto"`` (full: ``grad_w``; LoRA:
            ``grad_a`` when it is non-zero, else ``grad_b``).
        rank_tol: relative singular-value threshold of :func:`row_span`.

    Attributes:
        route: the route in use.
        span: the observed row span.
        hidden: hidden input columns the check accounts for (adaptive attacker only).
        offset: adaptive ``grad_b`` route: the fitted ``N = Q^T A[:, J]`` ((r - d) x k) or ``None``.
    """

    def __init__(
        self,
        update: LayerUpdate,
        *,
        attacker: str = "oblivious",
        route: str = "auto",
        rank_tol: float = 1e-5,
    ) -> None:
        _check_choice(attacker, ATTACKERS, "attacker")
        _check_choice(route, ROUTES, "route")
        if route == "auto":
            route = _auto_route(update)
        if route == "grad_w" and update.mode != "full":
            raise ValueError("route 'grad_w' needs a full fine-tuning update (grad_w is missing)")
        if route in ("grad_a", "grad_b") and update.mode != "lora":
            raise ValueError(f"route {route!r} needs a LoRA update; this one is full fine-tuning")
        self.update = update
        self.attacker = attacker
        self.route = route
        self.rank_tol = rank_tol
        n = update.width
        hidden = update.hidden if attacker == "adaptive" else np.zeros(0, np.int64)
        if route == "grad_b" and not update.a_hidden:
            hidden = np.zeros(0, np.int64)  # grad B is fully visible; with A known, nothing hides
        self.hidden = hidden
        self.visible = np.setdiff1d(np.arange(n), self.hidden)
        self.offset: torch.Tensor | None = None
        self._cov: torch.Tensor | None = None
        self._tol = 1e-3
        self.kappa = 3.0  # predictive interval width (in standard deviations) of the online check
        if route == "grad_b":
            self.a = torch.from_numpy(np.asarray(update.lora_a, np.float64))
            self.span = row_span(update.grad_b, rank_tol=rank_tol)
            self._q = self.span.complement() if self.hidden.size else None
        else:
            grad = update.grad_w if route == "grad_w" else update.grad_a
            self.span = row_span(np.asarray(grad)[:, self.visible], rank_tol=rank_tol)

    @property
    def rank(self) -> int:
        """Rank of the observed gradient (the number of distinct inputs it reveals)."""
        return self.span.rank

    @property
    def dimension(self) -> int:
        """Dimension of the space the check tests in (r for ``grad_b``, visible width else)."""
        return int(self.span.basis.shape[0])

    @property
    def vacuous(self) -> bool:
        """True when the observed span fills the tested space: every input passes the check."""
        return self.rank >= self.dimension

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Relative distance of layer inputs ``x`` (N, n) to the observed span, (N,) float64."""
        x = x.to(_DT)
        if self.route != "grad_b":
            return span_distances(x[:, self.visible], self.span)
        y = x @ self.a.T  # A (hidden columns as the attacker knows them) times x
        if not self.hidden.size:
            return span_distances(y, self.span)
        c = y @ self._q  # (N, r - d): must equal -N x_J for the true inputs
        if self.offset is not None:
            c = c + x[:, self.hidden] @ self.offset.T
        ynorm = y.norm(dim=1).clamp_min(1e-300)
        rho = c.norm(dim=1) / ynorm
        if self._cov is None:
            return rho
        # posterior predictive: inflate the tolerance by the uncertainty left in N
        zt = x[:, self.hidden] / ynorm[:, None]
        spread = ((zt @ self._cov) * zt).sum(1) * c.shape[1]
        tol = self._tol
        return rho / torch.sqrt(1.0 + (self.kappa**2) * spread / tol**2)

    @property
    def online(self) -> bool:
        """Adaptive ``grad_b`` check with hidden columns: ``N`` must be learned from the inputs."""
        return self.route == "grad_b" and self.hidden.size > 0

    def fit_posterior(self, x: torch.Tensor, *, span_tol: float) -> None:
        """Adaptive ``grad_b`` route: Bayesian estimate of ``N`` from inputs believed true.

        Prior: the entries of ``N = Q^T A[:, J]`` are i.i.d. N(0, sigma^2), with sigma^2 the
        mean square of the visible entries of ``A`` (at round 1, ``A``'s public init
        distribution). Observations: ``Q^T A_vis x_vis = -N x_J`` up to noise of size
        ``span_tol`` (relative). The posterior mean becomes :attr:`offset`, and
        :meth:`distances` then divides by the predictive spread, so an input whose hidden
        features are not yet pinned down by the data is judged leniently and the check becomes
        the exact one once they are. ``x`` may be empty (prior only).
        """
        if not self.online:
            return
        vis = self.a[:, self.visible]
        sigma2 = float(vis.pow(2).mean()) if vis.numel() else 1.0
        dof = max(1, self._q.shape[1])
        tau2 = span_tol**2 / dof
        k = self.hidden.size
        x = x.to(_DT)
        prec = torch.eye(k, dtype=_DT) / sigma2
        rhs = torch.zeros(self._q.shape[1], k, dtype=_DT)
        if x.shape[0]:
            y = x @ self.a.T
            w = 1.0 / y.norm(dim=1).clamp_min(1e-300)
            z = x[:, self.hidden] * w[:, None]
            c = (y @ self._q) * w[:, None]
            prec = prec + z.T @ z / tau2
            rhs = -(c.T @ z) / tau2
        cov = torch.linalg.inv(prec)
        self.offset = rhs @ cov
        self._cov = cov
        self._tol = span_tol

    def clear_posterior(self) -> None:
        """Back to the plain check with the current point estimate of ``N``."""
        self._cov = None

    def fit_offset(
        self,
        x: torch.Tensor,
        *,
        inliers: int,
        iterations: int = 30,
        ridge: float = 1e-9,
        exact_tol: float = 1e-4,
    ) -> None:
        """Adaptive ``grad_b`` route: fit ``N = Q^T A[:, J]`` by trimmed least squares.

        Concentration steps (Rousseeuw and Van Driessen's FAST-LTS "C-steps"): take the
        ``inliers`` inputs with the smallest residual, refit ``N`` by least squares on them,
        repeat until the inlier set stops changing. Starts: ``N = 0`` (the oblivious view) and
        least squares over the h/4, h/2, 2h and 4h closest (h = ``inliers``). The steps run on a
        pool of candidates (the closest under ``N = 0``, grown by the closest under every fit,
        since true inputs can lie far out while ``N`` is unknown); the last ones on all of ``x``.
        The true ``N`` fits the true inputs exactly, so a fit whose inliers are not all within
        ``exact_tol`` still holds an impostor: then every refit leaving out one (or, for up to
        40 inliers, two) of its inliers is tried as a start.

        Args:
            x: candidate layer inputs (N, n) (the whole vocabulary in layer 1).
            inliers: how many inputs are true (the rank of the observed gradient); must exceed
                the number of hidden columns k for the fit to mean anything.
            iterations: maximum concentration steps per start.
            ridge: Tikhonov term relative to the trace of ``Z^T Z``.
            exact_tol: residual (relative) below which an inlier counts as exactly fitted.
        """
        if not self.online:
            return
        x = x.to(_DT)
        y = x @ self.a.T
        w_all = 1.0 / y.norm(dim=1).clamp_min(1e-300)
        c_all = (y @ self._q) * w_all[:, None]
        z_all = x[:, self.hidden] * w_all[:, None]
        h = max(1, min(int(inliers), x.shape[0]))
        k = z_all.shape[1]
        eye = torch.eye(k, dtype=_DT)

        def solve(c: torch.Tensor, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            zz, cc = z[idx], c[idx]
            gram = zz.T @ zz
            gram = gram + ridge * max(float(gram.trace()), 1e-300) * eye
            return -torch.linalg.solve(gram, zz.T @ cc).T  # (r - d, k)

        def residual(c: torch.Tensor, z: torch.Tensor, n_: torch.Tensor) -> torch.Tensor:
            return (c + z @ n_.T).norm(dim=1)

        def csteps(c: torch.Tensor, z: torch.Tensor, n_: torch.Tensor):
            prev = None
            for _ in range(iterations):
                idx = torch.sort(torch.argsort(residual(c, z, n_))[:h]).values
                if prev is not None and torch.equal(idx, prev):
                    break
                prev = idx
                n_ = solve(c, z, idx)
            res = torch.sort(residual(c, z, n_)).values[:h]
            return n_, float(res.pow(2).sum()), float(res.max())

        zero = torch.zeros(c_all.shape[1], k, dtype=_DT)
        base = residual(c_all, z_all, zero)
        pool = torch.argsort(base)[: min(x.shape[0], max(4 * h, h + 200))]
        sizes = sorted({max(k + 1, int(f * h)) for f in (0.25, 0.5, 2, 4)})
        c, z = c_all[pool], z_all[pool]
        starts = [zero] + [solve(c, z, torch.arange(min(m, len(pool)))) for m in sizes]
        for _ in range(3):  # true inputs may lie outside the pool: widen it with each fit's best
            c, z = c_all[pool], z_all[pool]
            fits = [csteps(c, z, n_) for n_ in starts]
            grown = set(pool.tolist())
            for n_, _, _ in fits:
                grown |= set(torch.argsort(residual(c_all, z_all, n_))[: 2 * h].tolist())
            if len(grown) == len(pool):
                break
            pool = torch.tensor(sorted(grown))
            starts = [f[0] for f in fits]
        best = min(fits, key=lambda t: t[1])
        if best[2] > exact_tol and h > k + 1:
            best = self._drop_search(c, z, best, h, k, solve, residual, csteps, exact_tol)
        self.offset = csteps(c_all, z_all, best[0])[0]

    @staticmethod
    def _drop_search(c, z, best, h, k, solve, residual, csteps, exact_tol):
        """Refit without one (or, for up to 40 inliers, two) of the best fit's inliers."""
        inl = torch.argsort(residual(c, z, best[0]))[:h]
        drops = [[i] for i in range(h)]
        if h <= 40:
            drops += [[i, j] for i in range(h) for j in range(i + 1, h)]
        for drop in drops:
            keep = torch.ones(h, dtype=torch.bool)
            keep[drop] = False
            if int(keep.sum()) <= k:
                continue
            trial = csteps(c, z, solve(c, z, inl[keep]))
            if trial[1] < best[1]:
                best = trial
            if best[2] <= exact_tol:
                break
        return best


def _auto_route(update: LayerUpdate) -> str:
    """``grad_w`` for full fine-tuning; for LoRA ``grad_b`` when the broadcast ``B`` is zero
    (round 1: ``grad A = s B^T grad W`` carries nothing but noise), else ``grad_a``."""
    if update.mode == "full":
        return "grad_w"
    if update.lora_b is None or not np.any(update.lora_b):
        return "grad_b"
    return "grad_a"
