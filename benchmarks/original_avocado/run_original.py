"""Train the ORIGINAL Avocado (avocado-epigenome 0.4.1, Keras 2.3.1 + Theano 1.0.5) on pilot data.

Runs under the Python 3.8 venv made by ``setup.sh`` -- not under the project venv. Prints one
JSON object on the last line of stdout.

Throughput (default): builds the paper model (2 x 2048, 256 assay / 32 cell-type / 25 + 40 + 45
genome factors, batch 40,000) over the 1,126,469 pilot bins of all 25 tracks, compiles the Theano
training function (timed separately), then trains through ``Avocado.fit`` -- the package's own
sequential data generator and Keras ``fit_generator`` loop -- for ``--warmup + --steps`` batches.
Samples/s is the steady state over the last ``--steps`` batches, timed between batch-end
callbacks, so it includes the package's per-batch data generation exactly as a user gets it.
It also reports ``train_on_batch`` on pre-generated batches (the model step alone).

``--loo``: the demo check from the package README (small config 1 x 64, batch 10,000): for each
cell type, hold out its H3K4me3 track, train on the other 24 and report the per-track MSE of the
imputation and of the average-activity baseline (mean of the other cell types' H3K4me3).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time

CELLTYPES = ["E003", "E017", "E065", "E116", "E117"]
ASSAYS = ["H3K4me3", "H3K27me3", "H3K36me3", "H3K9me3", "H3K4me1"]
DEFAULT_DATA = "/work/shared/data/roadmap-pilot"

PAPER = dict(
    n_layers=2,
    n_nodes=2048,
    n_assay_factors=256,
    n_celltype_factors=32,
    n_25bp_factors=25,
    n_250bp_factors=40,
    n_5kbp_factors=45,
    batch_size=40000,
)
# The package README's "very small model that could be trained on a CPU".
SMALL = dict(
    n_layers=1,
    n_nodes=64,
    n_assay_factors=24,
    n_celltype_factors=32,
    n_25bp_factors=5,
    n_250bp_factors=20,
    n_5kbp_factors=30,
    batch_size=10000,
)


def _linked_blas_rc():
    """A theanorc that links Theano's C GEMM ops against numpy's bundled OpenBLAS.

    Without ``blas.ldflags`` Theano calls BLAS through numpy's C API; linked, its ``Gemm`` ops
    call ``sgemm_`` directly (measured 2,080 -> 2,315 samples/s on the 2-core VM at paper
    sizes). The library is numpy's own (``numpy.libs/libopenblas*.so``), reached through a
    ``libopenblas.so`` link in a per-user temp directory, so nothing is installed system-wide.
    """
    import glob
    import importlib.util
    import tempfile

    spec = importlib.util.find_spec("numpy")
    libs = os.path.join(os.path.dirname(os.path.dirname(spec.origin)), "numpy.libs")
    found = sorted(glob.glob(os.path.join(libs, "libopenblas*.so")))
    if not found:
        sys.exit(
            f"run_original: no libopenblas*.so in {libs}; expected numpy's bundled OpenBLAS "
            "(a manylinux numpy wheel). Use --blas numpy, or set THEANO_FLAGS/THEANORC yourself."
        )
    d = os.path.join(tempfile.gettempdir(), f"epiray-theano-blas-{os.getuid()}")
    os.makedirs(d, exist_ok=True)
    link = os.path.join(d, "libopenblas.so")
    if os.path.realpath(link) != os.path.realpath(found[0]):
        tmp = f"{link}.{os.getpid()}"
        os.symlink(found[0], tmp)
        os.replace(tmp, link)  # atomic: concurrent runs never see a missing link
    rc = os.path.join(d, "theanorc")
    text = (
        "[global]\nfloatX = float32\ndevice = cpu\ncxx = g++\n\n"
        f"[blas]\nldflags = -L{d} -lopenblas -Wl,-rpath,{d}\n"
    )
    with open(f"{rc}.{os.getpid()}", "w") as f:
        f.write(text)
    os.replace(f"{rc}.{os.getpid()}", rc)
    return rc


def _configure_backend(blas="linked"):
    """Select Theano on the CPU before Keras is imported (flags the caller set win).

    ``blas``: ``linked`` (default, the faster) links Theano's GEMM ops to numpy's bundled
    OpenBLAS; ``numpy`` leaves Theano on numpy's C-API BLAS, as the package's demo runs it.
    """
    os.environ.setdefault("KERAS_BACKEND", "theano")
    if "THEANO_FLAGS" in os.environ or "THEANORC" in os.environ:
        return
    if blas == "linked":
        os.environ["THEANORC"] = _linked_blas_rc()
    else:
        os.environ["THEANO_FLAGS"] = "floatX=float32,device=cpu,cxx=g++"


def load_pilot(data_dir):
    import numpy

    data = {}
    for celltype, assay in itertools.product(CELLTYPES, ASSAYS):
        path = os.path.join(data_dir, f"{celltype}.{assay}.pilot.arcsinh.npz")
        with numpy.load(path) as npz:
            data[(celltype, assay)] = npz["arr_0"]
    n = {len(v) for v in data.values()}
    if len(n) != 1:
        raise ValueError(f"pilot tracks differ in length: {sorted(n)}")
    return data, n.pop()


class BatchTimer:
    """Keras callback recording perf_counter at the end of every training batch."""

    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.begin = time.perf_counter()
                self.ends = []
                self.cpu = []
                self.losses = []

            def on_train_batch_end(self, batch, logs=None):
                self.ends.append(time.perf_counter())
                self.cpu.append(time.process_time())  # all threads of this process
                self.losses.append(float((logs or {}).get("loss", float("nan"))))

        return _Timer()


def backend_info():
    import keras
    import numpy
    import theano

    return {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "theano": theano.__version__,
        "numpy": numpy.__version__,
        "floatX": theano.config.floatX,
        "device": theano.config.device,
        "blas_ldflags": theano.config.blas.ldflags,
        "cxx": theano.config.cxx,
        "openmp": theano.config.openmp,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    }


def throughput(args, data, n_positions):
    import numpy
    from avocado import Avocado
    from avocado.io import sequential_data_generator

    params = dict(PAPER if args.config == "paper" else SMALL)
    if args.batch_size:
        params["batch_size"] = args.batch_size
    batch = params["batch_size"]
    numpy.random.seed(args.seed)  # noqa: NPY002 -- the package's generators use the global RNG

    t0 = time.perf_counter()
    model = Avocado(CELLTYPES, ASSAYS, n_genomic_positions=n_positions, **params)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.model._make_train_function()  # Theano compiles the training function here
    compile_s = time.perf_counter() - t0

    # The package's generator alone, for reference (fit() overlaps it with training in a thread).
    gen = sequential_data_generator(CELLTYPES, ASSAYS, data, n_positions, batch)
    t0 = time.perf_counter()
    gen_batches = [next(gen) for _ in range(3)]
    gen_s = (time.perf_counter() - t0) / 3

    # 1) The package's own training path: Avocado.fit (sequential generator + fit_generator).
    timer = BatchTimer()
    n_batches = args.warmup + args.steps
    t0 = time.perf_counter()
    model.fit(data, n_epochs=1, epoch_size=n_batches, verbose=0, callbacks=[timer])
    fit_wall = time.perf_counter() - t0
    if args.warmup < 1:
        raise ValueError("--warmup must be >= 1 (the first batch end starts the clock)")
    ends = timer.ends[args.warmup - 1 :]
    cpu = timer.cpu[args.warmup - 1 :]
    fit_sps = batch * (len(ends) - 1) / (ends[-1] - ends[0])
    fit_cpu_s = cpu[-1] - cpu[0]
    step_times = [round(b - a, 3) for a, b in zip(ends[:-1], ends[1:])]

    # 2) The model step alone: train_on_batch on pre-generated batches.
    tob = None
    if args.tob_steps > 0:
        model.model.train_on_batch(*gen_batches[0])  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(args.tob_steps):
            model.model.train_on_batch(*gen_batches[i % len(gen_batches)])
        tob_s = time.perf_counter() - t0
        tob_cpu = time.process_time() - c0
        tob = {
            "steps": args.tob_steps,
            "seconds": round(tob_s, 3),
            "process_cpu_s": round(tob_cpu, 3),
            "samples_per_cpu_s": round(batch * args.tob_steps / tob_cpu, 1),
            "samples_per_s": round(batch * args.tob_steps / tob_s, 1),
        }

    return {
        "config": args.config,
        "hyperparameters": params,
        "n_positions": n_positions,
        "n_tracks": len(data),
        "build_s": round(build_s, 3),
        "compile_s": round(compile_s, 3),
        "generator_s_per_batch": round(gen_s, 3),
        "fit": {
            "warmup_steps": args.warmup,
            "timed_steps": len(ends) - 1,
            "step_s": step_times,
            "wall_s_incl_warmup": round(fit_wall, 3),
            "samples_per_s": round(fit_sps, 1),
            "process_cpu_s": round(fit_cpu_s, 3),
            "samples_per_cpu_s": round(batch * (len(ends) - 1) / fit_cpu_s, 1),
            "first_loss": timer.losses[0],
            "last_loss": timer.losses[-1],
        },
        "train_on_batch": tob,
        "samples_per_s": round(fit_sps, 1),
    }


def loo(args, data, n_positions):
    import numpy
    from avocado import Avocado

    params = dict(SMALL)
    out = {}
    for celltype in args.loo_celltypes:
        numpy.random.seed(args.seed)  # noqa: NPY002 -- the package's generators use the global RNG
        held = (celltype, "H3K4me3")
        train = {k: v for k, v in data.items() if k != held}
        model = Avocado(CELLTYPES, ASSAYS, n_genomic_positions=n_positions, **params)
        t0 = time.perf_counter()
        model.fit(train, n_epochs=args.loo_epochs, epoch_size=args.loo_epoch_size, verbose=0)
        train_s = time.perf_counter() - t0
        truth = data[held].astype("float64")
        pred = model.predict(celltype, "H3K4me3").astype("float64")
        others = [data[(c, "H3K4me3")] for c in CELLTYPES if c != celltype]
        average = numpy.mean(numpy.stack(others), axis=0, dtype="float64")
        out[celltype] = {
            "mse_original": round(float(numpy.mean((pred - truth) ** 2)), 4),
            "mse_average_activity": round(float(numpy.mean((average - truth) ** 2)), 4),
            "train_s": round(train_s, 1),
        }
        print(json.dumps({celltype: out[celltype]}), file=sys.stderr, flush=True)
    return {
        "config": "small",
        "hyperparameters": params,
        "epochs": args.loo_epochs,
        "epoch_size": args.loo_epoch_size,
        "per_track": out,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--config", choices=["paper", "small"], default="paper")
    p.add_argument("--batch-size", type=int, default=0, help="override the config's batch size")
    p.add_argument("--warmup", type=int, default=2, help="fit() batches not timed")
    p.add_argument("--steps", type=int, default=6, help="fit() batches timed after warm-up")
    p.add_argument("--tob-steps", type=int, default=0, help="train_on_batch steps (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--blas",
        choices=["linked", "numpy"],
        default="linked",
        help="Theano's BLAS: numpy's OpenBLAS linked into its C ops, or numpy's C API",
    )
    p.add_argument("--loo", action="store_true", help="run the H3K4me3 leave-one-out check")
    p.add_argument("--loo-celltypes", nargs="+", default=CELLTYPES)
    p.add_argument("--loo-epochs", type=int, default=40)
    p.add_argument(
        "--loo-epoch-size", type=int, default=113, help="batches per epoch (113 x 10,000 ~ 1 pass)"
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")

    _configure_backend(args.blas)
    t0 = time.perf_counter()
    data, n_positions = load_pilot(args.data_dir)
    load_s = time.perf_counter() - t0
    import avocado  # noqa: F401  (imports keras/theano; reported below)

    result = {
        "implementation": "avocado-epigenome 0.4.1 (original)",
        "backend": backend_info(),
        "load_s": round(load_s, 3),
        "load_average_before": list(os.getloadavg()),
    }
    if args.loo:
        result["loo"] = loo(args, data, n_positions)
    else:
        result.update(throughput(args, data, n_positions))
    result["load_average_after"] = list(os.getloadavg())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
