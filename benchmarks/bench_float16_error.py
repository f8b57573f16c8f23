"""The error float16 storage adds, on real data (Roadmap pilot tracks, arcsinh scale).

For each of the 25 pilot tracks: max |x16 - x|, RMSE, and the MSE between the float16 copy and
the float32 original — to compare with imputation MSEs (~0.05-0.3 on this scale).

Usage: .venv/bin/python benchmarks/bench_float16_error.py
"""

from pathlib import Path

import numpy as np

PILOT = Path(__file__).resolve().parents[2] / "shared/data/roadmap-pilot"


def main() -> None:
    rows = []
    for p in sorted(PILOT.glob("*.npz")):
        x = np.load(p)["arr_0"].astype(np.float64)
        d = x.astype(np.float16).astype(np.float64) - x
        rows.append(
            (
                p.name.split(".pilot")[0],
                x.max(),
                np.abs(d).max(),
                np.sqrt(np.mean(d * d)),
                np.mean(d * d),
            )
        )
    print(f"{'track':16s} {'max x':>7s} {'max|err|':>9s} {'rmse':>9s} {'mse':>9s}")
    for r in rows:
        print(f"{r[0]:16s} {r[1]:7.3f} {r[2]:9.2e} {r[3]:9.2e} {r[4]:9.2e}")
    a = np.array([r[1:] for r in rows])
    rmse = np.sqrt(np.mean(a[:, 2] ** 2))
    mx, err, mse = a[:, 0].max(), a[:, 1].max(), a[:, 3].mean()
    print(f"{'all':16s} {mx:7.3f} {err:9.2e} {rmse:9.2e} {mse:9.2e}")


if __name__ == "__main__":
    main()
