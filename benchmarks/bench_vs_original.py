"""Side by side: the ORIGINAL Avocado (Keras 2 + Theano) vs epiray's Avocado, CPU, pilot data.

Same data (the 25 Roadmap pilot tracks, 1,126,469 bins), same hyperparameters (paper: 2 x 2048,
32 biosample / 256 assay / 25 + 40 + 45 genome factors, batch 40,000), one run:

1. the original, ``avocado-epigenome==0.4.1``, in a subprocess under its Python 3.8 venv
   (``benchmarks/original_avocado/setup.sh``; run ``run_original.py``);
2. epiray's ``Avocado`` in this process, trained by ``epiray.loop.fit`` (dense Adam + row-wise
   sparse Adam on the genome factors) in a thread, exactly as a Ray Train worker runs it.

Both sides run with the same glibc malloc settings: ``--malloc reuse`` (default; what
``scaling.cpu_malloc: reuse`` gives CPU Train workers) or ``system``; the script re-executes
itself with ``GLIBC_TUNABLES`` set accordingly, since glibc reads it at process start.

Both figures are steady-state samples/s after warm-up: the original's between Keras batch-end
callbacks of ``Avocado.fit`` (its own generator and loop); epiray's over one ``fit`` epoch of
``--steps`` batches after a warm-up epoch whose optimiser state it resumes from. Each side also
reports samples per process CPU-second, which moves less with other load on a shared machine.
Prints one JSON object (last line of stdout) with both, their ratio and the load averages.

    .venv/bin/python benchmarks/bench_vs_original.py
    .venv/bin/python benchmarks/bench_vs_original.py --steps 4 --original-python /path/python
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RUN_ORIGINAL = HERE / "original_avocado" / "run_original.py"
DEFAULT_VENV = HERE / "_work" / "avocado38"
DEFAULT_DATA = Path("/work/shared/data/roadmap-pilot")
CELLTYPES = ["E003", "E017", "E065", "E116", "E117"]
ASSAYS = ["H3K4me3", "H3K27me3", "H3K36me3", "H3K9me3", "H3K4me1"]
PAPER = {
    "n_layers": 2,
    "n_nodes": 2048,
    "n_assay_factors": 256,
    "n_biosample_factors": 32,
    "n_genome_factors": (25, 40, 45),
}


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def original_python(arg: str | None) -> Path:
    """The Python 3.8 venv interpreter: ``--original-python``, ``$AVOCADO38_VENV`` or default."""
    if arg:
        return Path(arg)
    venv = Path(os.environ.get("AVOCADO38_VENV", DEFAULT_VENV))
    return venv / "bin" / "python"


def run_original(args: argparse.Namespace) -> dict:
    """Run ``run_original.py`` in the py3.8 venv; its last stdout line is JSON."""
    py = original_python(args.original_python)
    if not py.exists():
        sys.exit(
            f"bench_vs_original: no original-Avocado venv at {py}; expected the interpreter "
            "made by benchmarks/original_avocado/setup.sh. Run that script first, or pass "
            "--original-python."
        )
    cmd = [
        str(py),
        str(RUN_ORIGINAL),
        "--config",
        "paper",
        "--data-dir",
        str(args.data_dir),
        "--batch-size",
        str(args.batch_size),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--seed",
        str(args.seed),
        "--blas",
        args.original_blas,
    ]
    print("original:", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        sys.exit(f"bench_vs_original: the original exited with {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        sys.exit("bench_vs_original: the original printed no JSON result")
    return json.loads(lines[-1])


def load_pilot(data_dir: Path) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """All 25 tracks as one ``[25, n]`` float32 array and their (celltype, assay) keys."""
    keys = list(itertools.product(CELLTYPES, ASSAYS))
    tracks = []
    for celltype, assay in keys:
        with np.load(data_dir / f"{celltype}.{assay}.pilot.arcsinh.npz") as npz:
            tracks.append(np.asarray(npz["arr_0"], dtype=np.float32))
    return np.stack(tracks), keys


def run_epiray(args: argparse.Namespace) -> dict:
    """Train epiray's Avocado with ``epiray.loop.fit`` on the same data; steady-state rate."""
    import torch

    from epiray.loop import LoopParams, fit
    from epiray.models import Vocabulary, chrom_data_from_numpy, get_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    values, keys = load_pilot(args.data_dir)
    n = values.shape[1]
    records = [(f"{c}.{a}", c, a, "human") for c, a in keys]
    vocab = Vocabulary.from_records(records, chrom="pilot", n_bins=n)
    data = chrom_data_from_numpy(
        values,
        [vocab.biosample_index(c) for c, _ in keys],
        [vocab.assay_index(a) for _, a in keys],
        chrom="pilot",
        device="cpu",
    )
    load_s = time.perf_counter() - t0

    torch.manual_seed(args.seed)
    cls = get_model("avocado")
    t0 = time.perf_counter()
    model = cls.build(cls.Params(**PAPER), vocab, data)
    build_s = time.perf_counter() - t0
    loop = LoopParams(
        batch_size=args.batch_size,
        seed=args.seed,
        patience=None,
        restore_best=False,
        autocast=args.autocast,
    )

    # Warm-up epoch (first steps allocate the Adam moments), then the timed epoch resumes its
    # optimiser state, so only steady-state steps are timed. fit() times the epoch itself.
    # Both run in a thread, as a Ray Train worker runs its training function.
    def train() -> None:
        t0 = time.perf_counter()
        warm = loop.model_copy(update={"epochs": 1, "max_batches_per_epoch": args.warmup})
        state = fit(model, data, warm)
        out["warmup_s"] = time.perf_counter() - t0
        timed = loop.model_copy(update={"epochs": 2, "max_batches_per_epoch": args.steps})
        c0 = time.process_time()
        out["state"] = fit(model, data, timed, start_state=state)
        out["cpu_s"] = time.process_time() - c0

    out: dict = {}
    worker = threading.Thread(target=train)
    worker.start()
    worker.join()
    state, warmup_s, cpu_s = out["state"], out["warmup_s"], out["cpu_s"]
    epoch = state.history[-1]
    params = model.params.model_dump(mode="json")
    return {
        "implementation": "epiray Avocado (epiray.loop.fit)",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "autocast": args.autocast,
        "sparse_optimizer": loop.sparse_optimizer,
        "hyperparameters": {**params, "batch_size": args.batch_size},
        "n_positions": n,
        "n_tracks": len(keys),
        "load_s": round(load_s, 3),
        "build_s": round(build_s, 3),
        "warmup_steps": args.warmup,
        "warmup_s": round(warmup_s, 3),
        "timed_steps": args.steps,
        "timed_s": round(epoch["seconds"], 3),
        "samples_per_s": round(epoch["examples_per_s"], 1),
        "process_cpu_s": round(cpu_s, 3),
        "samples_per_cpu_s": round(epoch["examples"] / cpu_s, 1),
        # The loss over the few timed steps. It is no accuracy figure: this early the network
        # has learnt the mean and little else, so it is about the tracks' variance (0.2303 on
        # the pilot) in float32 and bf16 alike (0.23565 vs 0.23566 at 1 + 3 steps). Accuracy
        # at convergence, fp32 vs bf16: bench_pilot_loo.py avocado_shipped_{fp32,bf16}.
        "train_mse_timed_steps": round(epoch["train_mse"], 5),
        "tracks_variance": round(float(np.var(data.values.float().numpy())), 5),
    }


def _malloc_env(mode: str) -> None:
    """Re-run this script with ``GLIBC_TUNABLES`` as ``mode`` needs (glibc reads it at process
    start): both sides, the original's subprocess included, get the same allocator."""
    from epiray.runtime import malloc_environ

    env = malloc_environ(mode, os.environ)
    if os.environ.get("GLIBC_TUNABLES") == env.get("GLIBC_TUNABLES"):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--original-python", help="the py3.8 venv's python (default: setup.sh's)")
    p.add_argument("--batch-size", type=int, default=40_000)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto")
    p.add_argument("--timeout", type=float, default=3600, help="seconds for the original")
    p.add_argument(
        "--original-blas",
        choices=["linked", "numpy"],
        default="linked",
        help="the original's Theano BLAS (run_original.py --blas; linked is its faster)",
    )
    p.add_argument(
        "--malloc",
        choices=["reuse", "system"],
        default="reuse",
        help="glibc malloc for both sides: reuse (scaling.cpu_malloc's default) or system",
    )
    p.add_argument("--skip-original", action="store_true", help="epiray side only")
    p.add_argument("--skip-epiray", action="store_true", help="original side only")
    args = p.parse_args(argv)
    _malloc_env(args.malloc)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")

    result: dict = {
        "cpu_count": os.cpu_count(),
        "load_average_start": _loadavg(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    if not args.skip_original:
        result["original"] = run_original(args)
        result["load_average_after_original"] = _loadavg()
        print(
            f"original: {result['original']['samples_per_s']:.0f} samples/s "
            f"(compile {result['original']['compile_s']:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    if not args.skip_epiray:
        result["epiray"] = run_epiray(args)
        result["load_average_after_epiray"] = _loadavg()
        print(f"epiray: {result['epiray']['samples_per_s']:.0f} samples/s", file=sys.stderr)
    if "original" in result and "epiray" in result:
        o, e = result["original"], result["epiray"]
        result["ratio_samples_per_s"] = round(e["samples_per_s"] / o["samples_per_s"], 2)
        result["ratio_samples_per_cpu_s"] = round(
            e["samples_per_cpu_s"] / o["fit"]["samples_per_cpu_s"], 2
        )
        print(
            f"epiray / original: {result['ratio_samples_per_s']}x samples/s, "
            f"{result['ratio_samples_per_cpu_s']}x samples per CPU-second",
            file=sys.stderr,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
