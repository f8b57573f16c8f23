"""Scoring speed of the full metric set (epiray.metrics) on a 2.5 M-bin track.

Prints bins/s per core for :func:`score_track` (all 13 metrics, with promoter/gene/enhancer/
blacklist masks and variance weights), for its two parts (moment metrics only, rank metrics
only), for :class:`TrackScorer` fed 10 chunks, and for float16 inputs. Runs single-threaded
(numpy's sorts and reductions are single-threaded; BLAS threads are pinned to 1 so the figure is
per core).

    .venv/bin/python benchmarks/bench_metrics.py [--bins 2500000] [--repeats 3]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from epiray import metrics as M  # noqa: E402


def make_track(n: int, seed: int = 0):
    """Sparse peaky truth (arcsinh scale), a noisy imputation, masks and weights."""
    rng = np.random.default_rng(seed)
    y = np.arcsinh(5 * rng.gamma(0.3, 1.0, n) * (rng.random(n) < 0.6)).astype(np.float32)
    yhat = np.clip(0.7 * y + rng.normal(0, 0.3, n), 0, None).astype(np.float32)
    masks = {
        "prom": rng.random(n) < 0.05,
        "gene": rng.random(n) < 0.45,
        "enh": rng.random(n) < 0.01,
        "blacklist": rng.random(n) < 0.001,
    }
    w = rng.random(n).astype(np.float32)
    return y, yhat, masks, w


def best_of(fn, repeats: int) -> tuple[float, float]:
    """Best wall-clock and best CPU (process) time over ``repeats`` runs, in seconds.

    On a shared machine the CPU time is the better per-core figure: it does not count the time
    the process waited for a core.
    """
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bins", type=int, default=2_500_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    n = args.bins
    y, h, masks, w = make_track(n)
    y16, h16 = y.astype(np.float16), h.astype(np.float16)
    opts = dict(top_fraction=0.01, peak_quantile=0.99, peak_threshold=None)

    def moments_only():
        Y, H, regions, ww, _ = M._prepare(y, h, masks, w, "bench")
        M._Moments.of(Y, H, regions, ww).finish()

    def ranks_only():
        Y, H, _, _, _ = M._prepare(y, h, masks, w, "bench")
        M._rank_metrics(Y, H, **opts)

    def streaming():
        s = M.TrackScorer()
        for part in np.array_split(np.arange(n), 10):
            s.add(
                y[part],
                h[part],
                masks={k: m[part] for k, m in masks.items()},
                var_weights=w[part],
            )
        s.result()

    cases = [
        (
            "score_track, float32, full set",
            lambda: M.score_track(y, h, masks=masks, var_weights=w),
        ),
        (
            "score_track, float16 inputs",
            lambda: M.score_track(y16, h16, masks=masks, var_weights=w),
        ),
        ("  moment metrics only (mse, pearson, regions, var)", moments_only),
        ("  rank metrics only (spearman, top 1%, auroc, auprc, peaks)", ranks_only),
        ("TrackScorer, 10 chunks, keep='exact'", streaming),
    ]
    print(
        f"epiray metrics benchmark: {n:,} bins, best of {args.repeats}; numpy {np.__version__}, "
        f"{platform.processor() or platform.machine()}, single thread"
    )
    print(f"{'':<62s} {'wall s':>7s} {'cpu s':>7s}  {'M bins/s per core (cpu)':>23s}")
    for name, fn in cases:
        fn()  # warm-up
        wall, cpu = best_of(fn, args.repeats)
        print(f"{name:<62s} {wall:7.3f} {cpu:7.3f}  {n / cpu / 1e6:23.2f}")


if __name__ == "__main__":
    main()
