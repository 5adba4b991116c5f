"""The projector: the recipe of the family nearest to a weight-space point (exhaustive over a component's inclusion
bits up to ``EXHAUSTIVE_BITS``, local search beyond; closed-form alphas)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from astolfo_opt.search.strategies import Params
from astolfo_opt.search.surrogate.geometry import ParamMap, _Comp

#: exhaustive search over the inclusion bits of a component up to this many bits, local search beyond
EXHAUSTIVE_BITS = 14


def _configs(m: int) -> np.ndarray:
    """All 0/1 rows of length ``m`` (2^m x m)."""
    return ((np.arange(1 << m)[:, None] >> np.arange(m)[None, :]) & 1).astype(float)


class Projector:
    """The recipe nearest (in weight space) to a centre u°: per component, the inclusion bits (exhaustive up to
    ``EXHAUSTIVE_BITS`` bits, local flips beyond) with every block's α in closed form (the distance is quadratic in
    α_b: α_b = clip(vᵀG_b u°_b / vᵀG_b v)). Components are independent in the squared distance."""

    def __init__(self, pm: ParamMap):
        self.pm = pm
        self.G = pm.ws.gram
        self.cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _table(self, ci: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bit rows X, coefficient rows V, vᵀG_k v per row and block) of component ``ci`` (exhaustive case)."""
        if ci not in self.cache:
            c = self.pm.comps[ci]
            X = _configs(len(c.bits))
            need = min(self.pm.min_models, len(c.bits))
            X = X[X.sum(1) >= need]
            V = self._coeffs(c, X)
            Q = np.einsum("cn,knm,cm->ck", V, self.G[c.rows], V)
            self.cache[ci] = (X, V, Q)
        return self.cache[ci]

    def _coeffs(self, c: _Comp, X: np.ndarray) -> np.ndarray:
        n = len(self.pm.ws.names)
        M = np.zeros((len(c.bits), n))
        for i, j in enumerate(c.bit_col):
            if j >= 0:
                M[i, j] = 1.0
        cnt = np.maximum(X.sum(1, keepdims=True), 1.0)
        return (X @ M) / cnt

    def _score(self, c: _Comp, V: np.ndarray, Q: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Squared distance of each row's recipe to centre rows ``T`` [rows, n], and the rows' alphas [C, rows]."""
        Gk = self.G[c.rows]
        GT = np.einsum("knm,km->kn", Gk, T)  # [R, n]
        L = V @ GT.T  # [C, R]
        TT = np.einsum("kn,kn->k", T, GT)
        A = np.ones_like(L)
        for i in range(len(c.rows)):
            if c.mbw and c.alpha[i]:
                d = self.pm.dists[c.alpha[i]]  # type: ignore[index]
                lo, hi = float(d.low), float(d.high)  # type: ignore[attr-defined]
                with np.errstate(divide="ignore", invalid="ignore"):
                    a = np.where(Q[:, i] > 1e-300, L[:, i] / Q[:, i], hi)
                a = np.clip(a, lo, hi)
                step = getattr(d, "step", None)
                if step:
                    a = np.clip(lo + np.round((a - lo) / step) * step, lo, hi)
                A[:, i] = a
            elif c.mbw:
                A[:, i] = c.alpha_default
        d2 = (A**2 * Q - 2 * A * L).sum(1) + TT.sum()
        return d2, A

    def project(self, Uc: np.ndarray, start: Mapping[str, Any] | None = None) -> tuple[Params, float]:
        """(params, squared distance) of the recipe nearest to ``Uc`` [K, n]."""
        out: Params = {}
        total = 0.0
        for ci, c in enumerate(self.pm.comps):
            T = Uc[c.rows]
            if not c.bits:
                V = c.fixed[None]  # type: ignore[index]
                Q = np.einsum("cn,knm,cm->ck", V, self.G[c.rows], V)
                d2, A = self._score(c, V, Q, T)
                X, i = np.zeros((1, 0)), 0
            elif len(c.bits) <= EXHAUSTIVE_BITS:
                X, V, Q = self._table(ci)
                d2, A = self._score(c, V, Q, T)
                i = int(np.argmin(d2))
            else:
                X, d2, A, i = self._local(c, T, start)
            total += float(d2[i])
            for b, v in zip(c.bits, X[i], strict=True):
                out[b] = int(v)
            for r, name in enumerate(c.alpha):
                if name:
                    out[name] = float(A[i, r])
        return out, total

    def _local(self, c: _Comp, T: np.ndarray, start: Mapping[str, Any] | None):
        """First-best single-flip descent from the incumbent's bits and from all-in (large components)."""
        need = min(self.pm.min_models, len(c.bits))
        best = None
        starts = [np.ones(len(c.bits))]
        if start is not None:
            starts.append(np.array([float(start[b]) for b in c.bits]))
        for x in starts:
            if x.sum() < need:
                x = np.ones(len(c.bits))
            while True:
                X = np.vstack([x, np.abs(np.eye(len(x)) - x[None])])
                X = X[(X.sum(1) >= need) | (np.arange(len(X)) == 0)]  # row 0 (the current bits) always stays
                V = self._coeffs(c, X)
                Q = np.einsum("cn,knm,cm->ck", V, self.G[c.rows], V)
                d2, A = self._score(c, V, Q, T)
                i = int(np.argmin(d2))
                if i == 0 or np.array_equal(X[i], x):
                    break
                x = X[i]
            if best is None or d2[0] < best[1][0]:
                best = (X, d2, A, 0)
        return best

