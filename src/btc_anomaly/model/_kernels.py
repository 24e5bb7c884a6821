"""numba kernels of the compiled forest (see ``scorer.py`` for the layout). Imported only when numba is."""

from __future__ import annotations

import numba as nb
import numpy as np

BLOCK = 64  # rows per block: their heap slots and feature rows stay in L1 while one tree is walked
PARALLEL_CHUNK = 1024  # rows per parallel task


@nb.njit(nogil=True, cache=True)
def path_sums_serial(X, feat, thr, nan_right, leaf, depth, has_nan, out):  # type: ignore[no-untyped-def]
    n = X.shape[0]
    n_trees, width = feat.shape
    slot = np.empty(BLOCK, np.int64)
    for start in range(0, n, BLOCK):
        m = min(n - start, BLOCK)
        for r in range(m):
            out[start + r] = 0.0
        # Tree-major inside a block: rows of a block are independent, so their walks overlap in the
        # CPU instead of waiting on one dependent load chain per (row, tree).
        for t in range(n_trees):
            ft = feat[t]
            tt = thr[t]
            for r in range(m):
                slot[r] = 1
            for _ in range(depth):
                for r in range(m):
                    i = slot[r]
                    v = X[start + r, ft[i]]
                    if has_nan and v != v:
                        slot[r] = 2 * i + nan_right[t, i]
                    else:
                        slot[r] = 2 * i + (v > tt[i])
            # Trees are added in order, as sklearn does, so the float64 sums are identical.
            for r in range(m):
                out[start + r] += leaf[t, slot[r] - width]


@nb.njit(nogil=True, parallel=True, cache=True)
def path_sums_parallel(X, feat, thr, nan_right, leaf, depth, has_nan, out):  # type: ignore[no-untyped-def]
    n = X.shape[0]
    for b in nb.prange((n + PARALLEL_CHUNK - 1) // PARALLEL_CHUNK):
        s = b * PARALLEL_CHUNK
        e = min(n, s + PARALLEL_CHUNK)
        path_sums_serial(X[s:e], feat, thr, nan_right, leaf, depth, has_nan, out[s:e])


@nb.njit(nogil=True, cache=True)
def path_savings(X, feat, thr, nan_right, save_left, save_right, depth, out):  # type: ignore[no-untyped-def]
    n = X.shape[0]
    n_trees = feat.shape[0]
    for r in range(n):
        for t in range(n_trees):
            i = 1
            for _ in range(depth):
                f = feat[t, i]
                v = X[r, f]
                right = nan_right[t, i] if v != v else v > thr[t, i]
                out[r, f] += save_right[t, i] if right else save_left[t, i]
                i = 2 * i + right
