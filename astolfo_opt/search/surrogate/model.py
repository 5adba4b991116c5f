"""The score model: ``y ≈ a - b·‖θ - θ°‖^p`` around an unknown best merge θ°, fitted by MAP (Laplace posterior for
Thompson draws)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from astolfo_opt.search.surrogate.geometry import ParamMap

#: evaluation cap of one least-squares fit: a fit converges in < 100; the rare one that oscillates around the cone's
#: apex (the centre on a trial) is stopped at its best point instead of costing seconds per proposal
MAX_NFEV = 400


def _sig(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))


class RadialSurrogate:
    """``y ≈ a - b·‖θ - θ°‖^p``: the objective falls off with the weight-space distance from an unknown best merge θ°.

    θ° is a *continuous* member of the recipe family (inclusion weights ``w ∈ (0,1)`` per model, normalised; a
    per-block MBW α), so it has as many unknowns as the space has parameters, while every trial - wherever it lies -
    informs all of them at once through its exact distance to θ° (the pool's block Gram matrices). ``a, b`` are
    fitted too, and ``p`` with ``fit_power`` (else ``power``; 1: a cone, 2: the quadratic any smooth scorer is near
    its optimum). The fit is a MAP
    Gauss-Newton least-squares over all trials (noise averages across them instead of deciding on one noisy
    comparison), with weak priors: weights around 0.5, block alphas shrunk towards their shared mean. Its Laplace
    posterior gives Thompson samples; each sample's θ° is mapped back to the nearest recipe exactly (``project``)."""

    def __init__(self, pm: ParamMap, *, s_w: float = 0.5, tau: float = 0.25, fit_power: bool = True, power: float = 1.0,
                 nu0: float = 3.0, sig0: float = 0.03, mu_sd: float = 0.5):
        self.pm = pm
        self.mu_sd = float(mu_sd)
        ws = pm.ws
        n = len(ws.names)
        self.scale = float(np.trace(ws.gram.sum(0))) / max(n, 1) or 1.0
        self.G = ws.gram / self.scale
        self.s_w, self.tau, self.fit_power, self.power = s_w, tau, fit_power, power
        self.nu0, self.sig0 = float(nu0), float(sig0)
        self.slots: list[tuple[str, Any]] = []  # (kind, info) per parameter of x
        for ci, c in enumerate(pm.comps):
            if c.bits:
                for j in c.bit_col:
                    if j >= 0:
                        self.slots.append(("w", (ci, j)))
                if not c.mbw and -1 in c.bit_col:
                    self.slots.append(("w_ref", ci))
            if c.mbw and any(c.alpha):
                for i, a in enumerate(c.alpha):
                    if a:
                        self.slots.append(("alpha", (ci, i)))
                self.slots.append(("mu", ci))
        self.i_a, self.i_b = len(self.slots), len(self.slots) + 1
        self.slots += [("a", None), ("beta", None)]
        if fit_power:
            self.i_p = len(self.slots)
            self.slots.append(("pow", None))
        self.P = len(self.slots)
        self._idx = {sl: i for i, sl in enumerate(self.slots) if sl[0] in ("w", "w_ref", "alpha")}
        self._mu = {info: i for i, (kind, info) in enumerate(self.slots) if kind == "mu"}
        self.x: np.ndarray | None = None
        self.chol: np.ndarray | None = None  # lower Cholesky factor of the posterior precision (Laplace)
        self.sigma = float("nan")

    # ---- the centre θ° and its derivative ---------------------------------------------------------------------
    def centre(self, x: np.ndarray, jac: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """``u°`` [K, n] of the parameter vector ``x`` (and ``du°/dx`` [P, K, n]). Weights and alphas are plain reals
        (the centre may leave the box; ``project`` clips), which keeps the fit close to linear."""
        ws, pm = self.pm.ws, self.pm
        K, n = len(ws.blocks), len(ws.names)
        U = np.zeros((K, n))
        J = np.zeros((self.P, K, n)) if jac else None
        idx = self._idx
        for ci, c in enumerate(pm.comps):
            if c.bits:
                cols = [j for j in c.bit_col if j >= 0]
                w = {j: float(x[idx[("w", (ci, j))]]) for j in cols}
                wr = float(x[idx[("w_ref", ci)]]) if ("w_ref", ci) in idx else 0.0
                W = sum(w.values()) + wr
                W = W if abs(W) > 1e-6 else 1e-6
                ch = np.zeros(n)
                for j in cols:
                    ch[j] = w[j] / W
            else:
                ch = c.fixed  # type: ignore[assignment]
            for i, k in enumerate(c.rows):
                free = c.mbw and c.alpha[i] is not None
                a = float(x[idx[("alpha", (ci, i))]]) if free else (c.alpha_default if c.mbw else 1.0)
                U[k] = a * ch
                if J is not None:
                    if free:
                        J[idx[("alpha", (ci, i))], k] = ch
                    if c.bits:
                        for j in cols:
                            e = -ch.copy()
                            e[j] += 1.0
                            J[idx[("w", (ci, j))], k] = a * e / W
                        if ("w_ref", ci) in idx:
                            J[idx[("w_ref", ci)], k] = -a * ch / W
        return U, J

    def prior_mean(self) -> np.ndarray:
        x = np.zeros(self.P)
        for i, (kind, _info) in enumerate(self.slots):
            x[i] = {"w": 0.5, "w_ref": 0.5, "alpha": 0.6, "mu": 0.6}.get(kind, 0.0)
        return x

    def x_from_params(self, params: Mapping[str, Any]) -> np.ndarray:
        """A start point for the fit: the centre at a given recipe (its bits as weights 1 / 0, its alphas)."""
        x = self.prior_mean()
        for i, (kind, info) in enumerate(self.slots):
            if kind in ("w", "w_ref"):
                c = self.pm.comps[info if kind == "w_ref" else info[0]]
                b = c.bits[c.bit_col.index(-1 if kind == "w_ref" else info[1])]
                x[i] = float(params[b])
            elif kind == "alpha":
                c = self.pm.comps[info[0]]
                x[i] = float(params[c.alpha[info[1]]])  # type: ignore[index]
        for ci, m in self._mu.items():
            al = [x[i] for i, (kind, info) in enumerate(self.slots) if kind == "alpha" and info[0] == ci]
            x[m] = float(np.mean(al)) if al else 0.6
        return x

    def _power(self, x: np.ndarray) -> tuple[float, float]:
        if not self.fit_power:
            return self.power, 0.0
        s = float(_sig(x[self.i_p]))
        return 0.5 + 2.0 * s, 2.0 * s * (1 - s)

    # ---- fit ----------------------------------------------------------------------------------------------------
    def _prior(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prior residuals and their Jacobian: weights ~ N(0.5, s_w²), block alphas ~ N(shared μ, τ²), μ ~ N(0.6, mu_sd²),
        weak priors on the link. Why τ is small by default: one block's alpha moves the score far less than the noise
        of a scorer (see experiments/README_bench_search.md), so free block alphas mostly fit noise; shrinking them to
        their shared value leaves the data to the inclusion weights, which decide most of the score."""
        r = np.zeros(self.P)
        g = np.zeros((self.P, self.P))
        for i, (kind, info) in enumerate(self.slots):
            if kind in ("w", "w_ref"):
                r[i], g[i, i] = (x[i] - 0.5) / self.s_w, 1 / self.s_w
            elif kind == "alpha":
                m = self._mu[info[0]]
                r[i], g[i, i], g[i, m] = (x[i] - x[m]) / self.tau, 1 / self.tau, -1 / self.tau
            elif kind == "mu":
                r[i], g[i, i] = (x[i] - 0.6) / self.mu_sd, 1 / self.mu_sd
            elif kind == "a":
                r[i], g[i, i] = (x[i] - self.a0) / self.s_a, 1 / self.s_a
            elif kind == "beta":
                r[i], g[i, i] = (x[i] - self.b0) / 3.0, 1 / 3.0
            elif kind == "pow":
                r[i], g[i, i] = x[i] / 1.5, 1 / 1.5
        return r, g

    def predict(self, x: np.ndarray, U: np.ndarray, jac: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """ŷ for coordinates ``U`` [N, K, n] (and dŷ/dx [N, P])."""
        Uc, Jc = self.centre(x, jac)
        E = U - Uc[None]
        GE = np.einsum("knm,ikm->ikn", self.G, E)
        d2 = np.einsum("ikn,ikn->i", E, GE)
        D = np.sqrt(d2 + 1e-8)
        p, dp = self._power(x)
        a, b = x[self.i_a], math.exp(x[self.i_b])
        Dp = D**p
        y = a - b * Dp
        if not jac:
            return y, None
        Jy = np.zeros((len(U), self.P))
        Jy[:, self.i_a] = 1.0
        Jy[:, self.i_b] = -b * Dp
        if self.fit_power:
            Jy[:, self.i_p] = -b * Dp * np.log(D) * dp
        # dŷ/du° = b p D^(p-2) G (u - u°)
        gk = (b * p * D ** (p - 2))[:, None, None] * GE
        Jy += np.einsum("ikn,pkn->ip", gk, Jc)
        return y, Jy

    def fit(self, U: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, starts: Sequence[np.ndarray] = ()) -> float:
        """MAP fit over trials (``U`` [N, K, n], ``y`` [N], maximised); returns the noise estimate σ."""
        from scipy.optimize import least_squares

        y = np.asarray(y, dtype=float)
        wts = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
        rng_y = float(y.max() - y.min()) or 1.0
        self.a0, self.s_a = float(y.max()), 3.0 * rng_y
        sig0 = self.sig0 * rng_y
        x_inits = [np.asarray(s, dtype=float) for s in starts] or [self.prior_mean()]
        # the link's scale from the data: b ~ range(y) / typical distance of the trials from the first start
        _, _ = self.centre(x_inits[0])
        xs = x_inits[0].copy()
        xs[self.i_b] = 0.0
        xs[self.i_a] = self.a0
        y0, _ = self.predict(xs, U)
        dtyp = float(np.median(self.a0 - y0)) or 1.0
        self.b0 = math.log(rng_y / max(dtyp, 1e-9))
        sigma = sig0
        best = None
        for _it in range(2):
            def fun(x, s=sigma):
                yh, _ = self.predict(x, U)
                pr, _ = self._prior(x)
                return np.concatenate([(y - yh) * wts / s, pr])

            def jac(x, s=sigma):
                _, Jy = self.predict(x, U, jac=True)
                _, pj = self._prior(x)
                return np.vstack([-Jy * (wts / s)[:, None], pj])

            cands = [best.x] if best is not None else []
            if best is None:
                for x0 in x_inits:
                    x0 = x0.copy()
                    x0[self.i_a], x0[self.i_b] = self.a0, self.b0
                    cands.append(x0)
            res = [least_squares(fun, x0, jac=jac, method="lm", xtol=1e-8, ftol=1e-8,
                                   max_nfev=MAX_NFEV) for x0 in cands]
            best = min(res, key=lambda r: r.cost)
            Jd = best.jac[: len(y)]
            H = best.jac.T @ best.jac
            Hinv = np.linalg.pinv(H)
            p_eff = float(np.trace(Jd @ Hinv @ Jd.T))
            rss = float(np.sum(((best.fun[: len(y)]) * sigma) ** 2))
            sigma = math.sqrt((self.nu0 * sig0**2 + rss) / max(self.nu0 + len(y) - p_eff, 1.0))
        # posterior at the final σ
        _, Jy = self.predict(best.x, U, jac=True)
        _, pj = self._prior(best.x)
        Jf = np.vstack([-Jy * (wts / sigma)[:, None], pj])
        self.x, self.sigma = best.x, sigma
        self.chol = _precision_cholesky(Jf.T @ Jf)
        self.cost = float(best.cost)
        return sigma

    def sample(self, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
        """A Thompson draw of x from the Laplace posterior (``scale`` 0: the MAP point)."""
        assert self.x is not None and self.chol is not None
        if scale <= 0:
            return self.x.copy()
        # H = L Lᵀ, so x̂ + L⁻ᵀz has covariance H⁻¹. The Cholesky factor is unique and continuous in H: the same
        # study gives the same draw on every machine. An eigendecomposition is not (each eigenvector's sign, and the
        # basis of a repeated eigenvalue, is the LAPACK kernel's choice), and that flipped whole draws between CPUs.
        from scipy.linalg import solve_triangular

        return self.x + scale * solve_triangular(self.chol, rng.standard_normal(self.P), lower=True, trans="T")


def _precision_cholesky(H: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of a posterior precision ``H`` (symmetrised; PD through the prior rows, with the smallest
    jitter that makes it factor when rounding leaves it semi-definite)."""
    H = (H + H.T) / 2
    jitter = 0.0
    for _ in range(8):
        try:
            return np.linalg.cholesky(H + jitter * np.eye(len(H)))
        except np.linalg.LinAlgError:
            jitter = max(jitter * 100.0, 1e-10 * float(np.mean(np.diag(H))) or 1e-10)
    raise np.linalg.LinAlgError("posterior precision is not positive definite")

