"""Scaling-law fits of final loss against parameters N (and training tokens D).

- `kaplan`: L(N) = (N_c / N)^alpha, a straight line in log-log space (least squares), and the same
  with an irreducible term, L(N) = E + A / N^alpha.
- `chinchilla`: approach 3 of Hoffmann et al. (2022), L(N, D) = E + A / N^alpha + B / D^beta.

The forms with E are fitted as Chinchilla did: the Huber loss (delta = 1e-3) of log L, written as
a log-sum-exp of the terms, minimised by L-BFGS from the best points of a grid of starts, the
best solution kept. The
per-run losses are **summed**, not averaged: averaging shrinks the gradient below L-BFGS's
tolerance and stops it early (Besiroglu et al., 2024, on the original fit). Intervals are 95%
percentile bootstraps over runs (each resample refitted from the best starts of the full fit).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from hybridlm.errors import UserError

HUBER_DELTA = 1e-3
BOOTSTRAP_RESAMPLES = 200
OPTIMISED_STARTS = 20
"""L-BFGS runs from this many grid points, those with the least objective (every grid point is evaluated)."""
REFIT_STARTS = 5
"""Bootstrap resamples start from this many of the full fit's best solutions."""
GRID = {"alpha": (0.0, 0.5, 1.0, 1.5, 2.0), "e": (-1.0, 0.0, 1.0), "a": (0.0, 10.0, 20.0)}
"""Starting values (Chinchilla's grid, thinned in e, a and b): exponents, log E, log A (and log B,
beta alike): 675 starts for the N, D form."""
LBFGS_OPTIONS = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000}
"""scipy's default ftol (2.2e-9, relative to max(|f|, 1)) stops at once on a summed Huber loss of
order 1e-5: the same early stop that averaging caused in the original fit."""


def huber(residuals: np.ndarray, delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """(summed Huber loss, its derivative per residual)."""
    small = np.abs(residuals) <= delta
    loss = np.where(small, 0.5 * residuals**2, delta * (np.abs(residuals) - 0.5 * delta))
    return float(loss.sum()), np.where(small, residuals, delta * np.sign(residuals))


@dataclass(frozen=True)
class Terms:
    """log L-hat = logsumexp over the terms: (a - alpha log N), optionally (b - beta log D), and e."""

    with_data: bool

    def names(self) -> tuple[str, ...]:
        return ("a", "alpha", "b", "beta", "e") if self.with_data else ("a", "alpha", "e")

    def objective(self, theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray):
        if self.with_data:
            a, alpha, b, beta, e = theta
            terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
        else:
            a, alpha, e = theta
            terms = np.stack([a - alpha * log_n, np.full_like(log_n, e)])
        top = terms.max(0)
        weights = np.exp(terms - top)
        predicted = top + np.log(weights.sum(0))
        weights /= weights.sum(0)
        value, slope = huber(predicted - log_loss)
        if self.with_data:
            grad = [weights[0], -weights[0] * log_n, weights[1], -weights[1] * log_d, weights[2]]
        else:
            grad = [weights[0], -weights[0] * log_n, weights[1]]
        return value, np.array([(slope * g).sum() for g in grad])

    def starts(self) -> list[np.ndarray]:
        if self.with_data:
            grid = itertools.product(GRID["a"], GRID["alpha"], GRID["a"], GRID["alpha"], GRID["e"])
        else:
            grid = itertools.product(GRID["a"], GRID["alpha"], GRID["e"])
        return [np.array(start) for start in grid]


def _minimise(terms: Terms, starts: list[np.ndarray], data: tuple[np.ndarray, ...]) -> list[tuple[float, np.ndarray]]:
    """(objective, parameters) from each start, best first."""
    try:
        from scipy.optimize import minimize
    except ImportError:
        raise UserError("scaling fits need scipy: pip install 'hybridlm[analysis]'") from None

    results = []
    for start in starts:
        found = minimize(terms.objective, start, args=data, jac=True, method="L-BFGS-B", options=LBFGS_OPTIONS)
        results.append((float(found.fun), found.x))
    return sorted(results, key=lambda r: r[0])


def _named(terms: Terms, theta: np.ndarray) -> dict[str, float]:
    values = dict(zip(terms.names(), theta.tolist()))
    named = {"E": float(np.exp(values["e"])), "A": float(np.exp(values["a"])), "alpha": values["alpha"]}
    if terms.with_data:
        named |= {"B": float(np.exp(values["b"])), "beta": values["beta"]}
    return named


def _interval(samples: list[dict[str, float]], name: str) -> list[float]:
    values = np.array([s[name] for s in samples])
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def huber_fit(n: np.ndarray, losses: np.ndarray, d: np.ndarray | None = None, *, seed: int = 0,
              resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """E + A/N^alpha (+ B/D^beta with d): the parameters, their bootstrap intervals, the fit's objective."""
    terms = Terms(with_data=d is not None)
    log_d = np.log(d) if d is not None else np.zeros_like(n)
    data = (np.log(n), log_d, np.log(losses))
    grid = sorted(terms.starts(), key=lambda start: terms.objective(start, *data)[0])
    ranked = _minimise(terms, grid[:OPTIMISED_STARTS], data)
    best = _named(terms, ranked[0][1])
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(resamples):
        pick = rng.integers(len(n), size=len(n))
        refit = _minimise(terms, [theta for _, theta in ranked[:REFIT_STARTS]], tuple(x[pick] for x in data))
        samples.append(_named(terms, refit[0][1]))
    result = {"parameters": best, "ci95": {name: _interval(samples, name) for name in best},
              "objective": ranked[0][0]}
    if terms.with_data:
        a_exp = best["beta"] / (best["alpha"] + best["beta"])
        result["optimal_size_exponent"] = a_exp  # N_opt ~ C^a (Kaplan: 0.73; Chinchilla: ~0.5)
        result["optimal_size_exponent_ci95"] = _interval(
            [{"x": s["beta"] / (s["alpha"] + s["beta"])} for s in samples if s["alpha"] + s["beta"] > 0], "x")
    return result


def power_law_fit(n: np.ndarray, losses: np.ndarray, *, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """L = (N_c / N)^alpha by least squares on log L = alpha log N_c - alpha log N, bootstrap intervals."""
    def fit(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
        alpha = -slope
        return {"alpha": float(alpha), "N_c": float(np.exp(intercept / alpha)) if alpha else float("inf")}

    best = fit(n, losses)
    rng = np.random.default_rng(seed)
    samples = []
    while len(samples) < resamples:
        pick = rng.integers(len(n), size=len(n))
        if len(set(n[pick])) >= 2:  # a line needs two sizes
            samples.append(fit(n[pick], losses[pick]))
    return {"parameters": best, "ci95": {name: _interval(samples, name) for name in best}}


def optimal_frontier(parameters: dict[str, float], compute: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) minimising E + A/N^alpha + B/D^beta at compute C = 6 N D."""
    alpha, beta, a, b = parameters["alpha"], parameters["beta"], parameters["A"], parameters["B"]
    scale = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
    n_opt = scale * (compute / 6) ** (beta / (alpha + beta))
    return n_opt, compute / 6 / n_opt
