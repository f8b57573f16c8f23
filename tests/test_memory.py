"""Memory per worker: Avocado's estimate against the tensors it describes, and the GPU check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epiray.errors import EpirayError
from epiray.loop import LoopParams, fit
from epiray.models import SlabSize, Vocabulary, chrom_data_from_numpy
from epiray.models.avocado import Avocado, AvocadoParams
from epiray.train import check_worker_memory, describe_memory

GIB = 2**30


def _slab(lo: int, hi: int, n_exp: int = 6, n_val: int = 1):
    rng = np.random.default_rng(0)
    recs = [(f"e{i}", f"b{i % 3}", f"a{i // 3}", "mouse") for i in range(n_exp + n_val)]
    vocab = Vocabulary.from_records(recs, chrom="c", n_bins=hi)
    values = rng.random((n_exp + n_val, hi - lo), dtype=np.float32).astype(np.float16)
    data = chrom_data_from_numpy(
        values[:n_exp],
        [i % 3 for i in range(n_exp)],
        [i // 3 for i in range(n_exp)],
        chrom="c",
        lo=lo,
        n_bins=hi,
        value_dtype=torch.float16,
        val_values=values[n_exp:],
        val_biosample=[i % 3 for i in range(n_exp, n_exp + n_val)],
        val_assay=[i // 3 for i in range(n_exp, n_exp + n_val)],
    )
    return vocab, data


@pytest.mark.parametrize("lo", [0, 1_230])  # a slab that starts mid 5 kbp row has one more
def test_avocado_estimate_is_exact_for_parameters_state_and_data(lo):
    params = AvocadoParams(n_nodes=48, n_assay_factors=12, n_biosample_factors=6)
    vocab, data = _slab(lo, lo + 5_000)
    size = SlabSize.of(data)
    assert size.bins == 5_000 and size.value_bytes == 2 and size.val_experiments == 1
    tensors = [v for v in vars(data).values() if isinstance(v, torch.Tensor)]
    assert size.data_bytes() == sum(t.numel() * t.element_size() for t in tensors)

    est = Avocado.memory_estimate(params, vocab, size, batch_size=1_000)
    torch.manual_seed(0)
    model = Avocado.build(params, vocab, data)
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    assert est["genome"] == nbytes(model.sparse_parameters())
    # parameter, gradient and two Adam moments per synchronised float
    assert est["dense"] == 4 * nbytes(model.dense_parameters())
    state = fit(model, data, LoopParams(epochs=1, batch_size=1_000, max_batches_per_epoch=2))
    moments = [
        t for s in state.sparse_opt.values() for k, t in s.items() if k.startswith("exp_avg")
    ]
    assert est["genome_adam"] == nbytes(moments)
    assert est["total"] == sum(v for k, v in est.items() if k != "total")
    assert "memory per worker" in describe_memory(est, size)


def test_estimate_grows_with_bins_and_tracks_not_with_the_rest():
    params = AvocadoParams()  # paper sizes
    recs = [(f"e{i}", f"b{i % 50}", f"a{i // 50}", "mouse") for i in range(1_000)]
    vocab = Vocabulary.from_records(recs, chrom="chr1", n_bins=7_800_000)

    def est(bins, tracks):
        return Avocado.memory_estimate(params, vocab, SlabSize(0, bins, tracks), 40_000)

    a, b, c = est(1_000_000, 100), est(2_000_000, 100), est(1_000_000, 200)
    # genome factors: 25 + 40/10 + 45/200 floats per bin, fp32 + two Adam moments
    assert b["genome"] + b["genome_adam"] - a["genome"] - a["genome_adam"] == pytest.approx(
        1_000_000 * 29.225 * 12, rel=1e-3
    )
    assert c["data"] - a["data"] == 100 * (1_000_000 * 2 + 16)
    assert a["dense"] == b["dense"] == c["dense"] and a["working"] == b["working"]
    # a step never holds more examples than the worker has bins (one visit per bin per epoch)
    small = Avocado.memory_estimate(params, vocab, SlabSize(0, 10_000, 100), 40_000)
    assert small["working"] == est(1_000_000, 100)["working"] * 10_000 // 40_000
    # the paper's ~5 M synchronised parameters (network + factors of 50 biosamples, 20 assays)
    assert 4.9e6 < a["dense"] / 16 < 5.1e6


def test_gpu_check_names_the_run_and_how_many_workers_fit():
    mem = {"data": 30 * GIB, "genome": 10 * GIB, "genome_adam": 20 * GIB, "dense": GIB}
    mem["working"] = 2 * GIB
    mem["total"] = sum(mem.values())
    cpu = torch.device("cpu")
    check_worker_memory(mem, cpu, "train x chr1", 1)  # CPU workers are not checked
    check_worker_memory(mem, cpu, "train x chr1", 1, free=70 * GIB)  # fits
    with pytest.raises(EpirayError) as e:
        check_worker_memory(mem, cpu, "train avocado chr1", 2, free=40 * GIB)
    msg = str(e.value)
    # 60 GiB scale with bins on 2 workers: 120 GiB of them over 37 GiB left by the fixed part
    assert "train avocado chr1" in msg and "63.0 GiB" in msg and "40.0 GiB free" in msg
    assert "scaling.num_workers to at least 4" in msg
    with pytest.raises(EpirayError, match="Lower train.batch_size"):
        check_worker_memory(mem, cpu, "train avocado chr1", 2, free=2 * GIB)


@pytest.mark.gpu
def test_estimate_bounds_the_cuda_peak_of_a_training_epoch():
    dev = torch.device("cuda")
    params = AvocadoParams(n_nodes=1024)
    vocab, data = _slab(0, 400_000, n_exp=24)
    data = data.to(dev)
    loop = LoopParams(epochs=1, batch_size=40_000, autocast="off", max_batches_per_epoch=5)
    est = Avocado.memory_estimate(params, vocab, SlabSize.of(data), loop.batch_size)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(dev) - est["data"]
    torch.cuda.reset_peak_memory_stats(dev)
    model = Avocado.build(params, vocab, data)
    fit(model, data, loop)
    peak = torch.cuda.max_memory_allocated(dev) - base
    assert 0.5 * est["total"] < peak <= 1.25 * est["total"]
