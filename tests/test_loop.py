"""The training loop: resume from checkpoints, early stopping, optimisers, torch.distributed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epiray.errors import ConfigError, EpirayError, StoreError
from epiray.loop import LoopParams, RowAdam, TrainState, fit, load_checkpoint, save_checkpoint
from epiray.models import Vocabulary, chrom_data_from_numpy
from epiray.models.avocado import Avocado, AvocadoParams
from epiray.models.baselines import AverageActivity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = AvocadoParams(
    n_nodes=32, n_assay_factors=8, n_biosample_factors=4, n_genome_factors=(4, 4, 4)
)
TEST = ((0, 0), (3, 2))


def lowrank(nb: int, na: int, n: int, seed: int = 0, rank: int = 3) -> np.ndarray:
    """A positive rank-3 tensor ``[nb, na, n]`` with 10-bin structure (softplus of B·A·G)."""
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(nb, rank))
    a = rng.normal(size=(na, rank))
    g = np.repeat(rng.normal(size=(rank, -(-n // 10))), 10, 1)[:, :n]
    g = g + 0.5 * rng.normal(size=(rank, n))
    return np.log1p(np.exp(np.einsum("bk,ak,kn->ban", b, a, g) / 2)).astype(np.float32)


def problem(n=2000, lo=0, hi=None):
    """(tensor, vocabulary, ChromData of bins [lo, hi) with TEST held out for validation)."""
    t = lowrank(5, 4, n)
    train = [(b, a) for b in range(5) for a in range(4) if (b, a) not in TEST]
    vocab = Vocabulary.from_records(
        [(f"e{b}{a}", f"b{b}", f"a{a}", "mouse") for b in range(5) for a in range(4)],
        chrom="chrT",
        n_bins=n,
    )
    data = chrom_data_from_numpy(
        np.stack([t[b, a] for b, a in train]),
        [b for b, _ in train],
        [a for _, a in train],
        chrom="chrT",
        lo=lo,
        hi=n if hi is None else hi,
        n_bins=n,
        device="cpu",
        val_values=np.stack([t[b, a] for b, a in TEST]),
        val_biosample=[b for b, _ in TEST],
        val_assay=[a for _, a in TEST],
    )
    return t, vocab, data


@pytest.mark.parametrize(
    "schedule, shrinkage", [("constant", 0.0), ("cosine", 0.5)], ids=["plain", "cosine-shrunk"]
)
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, schedule, shrinkage):
    params = LoopParams(
        epochs=4, batch_size=300, lr=1e-2, patience=None, seed=3, lr_schedule=schedule
    )
    arch = TINY.model_copy(update={"biosample_shrinkage": shrinkage})
    _, vocab, data = problem(n=900)
    torch.manual_seed(0)
    whole = Avocado.build(arch, vocab, data)
    full = fit(whole, data, params)

    torch.manual_seed(0)
    first = Avocado.build(arch, vocab, data)
    saved = []

    def callback(state: TrainState, metrics: dict) -> None:
        if state.epoch == 2:
            saved.append(save_checkpoint(tmp_path / "ck" / "rank0.pt", first, state))
            raise KeyboardInterrupt  # the run is killed after epoch 2's checkpoint

    with pytest.raises(KeyboardInterrupt):
        fit(first, data, params, callback=callback)
    model, state = load_checkpoint(saved[0], data)
    assert state.epoch == 2 and len(state.history) == 2
    resumed = fit(model, data, params, start_state=state)
    for (name, p), q in zip(whole.state_dict().items(), model.state_dict().values()):
        assert torch.equal(p, q), name
    drop = {"seconds", "examples_per_s"}
    strip = [{k: v for k, v in h.items() if k not in drop} for h in full.history]
    assert [{k: v for k, v in h.items() if k not in drop} for h in resumed.history] == strip


def test_cosine_schedule_sets_both_rates_per_epoch(monkeypatch):
    _, vocab, data = problem(n=600)
    torch.manual_seed(0)
    model = Avocado.build(TINY, vocab, data)
    params = LoopParams(
        epochs=4, batch_size=200, lr=1e-2, sparse_lr=4e-2, patience=None, lr_schedule="cosine"
    )
    used: dict[str, list[float]] = {"dense": [], "sparse": []}
    for kind, cls in (("dense", torch.optim.Adam), ("sparse", RowAdam)):

        def step(self, *a, _step=cls.step, _kind=kind, **k):
            used[_kind].append(self.param_groups[0]["lr"])
            return _step(self, *a, **k)

        monkeypatch.setattr(cls, "step", step)
    state = fit(model, data, params)
    factors = [0.5 * (1 + np.cos(np.pi * e / 4)) for e in range(4)]
    assert [h["lr"] for h in state.history] == pytest.approx([1e-2 * f for f in factors])
    for kind, base in (("dense", 1e-2), ("sparse", 4e-2)):
        per_epoch = np.array(used[kind]).reshape(4, -1)  # 3 steps per epoch, 600 bins / 200
        assert per_epoch == pytest.approx(np.array(factors)[:, None] * base * np.ones((4, 3)))
    assert factors[0] == 1.0 and factors[-1] < 0.15


def test_penalty_is_optimised_but_not_reported_as_training_error():
    class Constant(Avocado):
        def penalty(self):
            return torch.tensor(1000.0)

    _, vocab, data = problem(n=600)
    params = LoopParams(epochs=2, batch_size=200, lr=1e-2, patience=None)
    runs = []
    for cls in (Avocado, Constant):
        torch.manual_seed(0)
        runs.append(fit(cls.build(TINY, vocab, data), data, params).history)
    # a constant penalty has no gradient: the same training, and train_mse leaves it out
    assert [h["train_mse"] for h in runs[0]] == [h["train_mse"] for h in runs[1]]
    assert runs[0][-1]["train_mse"] < 10


def test_early_stopping_restores_the_best_epoch():
    _, vocab, data = problem(n=600)
    torch.manual_seed(0)
    model = Avocado.build(TINY, vocab, data)
    # a learning rate so small that no epoch beats the first by min_delta
    params = LoopParams(epochs=20, batch_size=200, lr=1e-9, patience=2, min_delta=1e-3)
    seen = []
    state = fit(model, data, params, callback=lambda s, m: seen.append(m["epoch"]))
    assert state.stopped and seen == [1, 2, 3] and state.best_epoch == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, state.best_state[k]), k


def test_best_state_is_a_host_copy():
    _, vocab, data = problem(n=600)
    torch.manual_seed(0)
    model = Avocado.build(TINY, vocab, data)
    state = fit(model, data, LoopParams(epochs=3, batch_size=200, patience=None))
    assert state.best_epoch >= 1
    for k, v in model.state_dict().items():
        b = state.best_state[k]
        # on the host and its own storage: training on never writes through to it
        assert b.device.type == "cpu" and b.data_ptr() != v.data_ptr(), k


def test_resume_with_another_device_kinds_generator_reseeds(caplog):
    """A checkpoint's batch-generator state from a GPU run (16 bytes) cannot seed a CPU
    generator: the run resumes from a generator reseeded from seed and epoch, says so, and is
    reproducible."""
    _, vocab, data = problem(n=600)
    params = LoopParams(epochs=3, batch_size=200, patience=None, restore_best=False)
    ends = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Avocado.build(TINY, vocab, data)
        state = fit(model, data, params.model_copy(update={"epochs": 1}))
        state.generator = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state
        with caplog.at_level("WARNING", logger="epiray.loop"):
            state = fit(model, data, params, start_state=state)
        assert state.epoch == 3
        ends.append({k: v.clone() for k, v in model.state_dict().items()})
    assert "another kind of device" in caplog.text
    for k, v in ends[0].items():
        assert torch.equal(v, ends[1][k]), k


def test_compile_needs_a_torch_that_compiles_sparse_embeddings(monkeypatch):
    import epiray.loop as loop

    _, vocab, data = problem(n=600)
    model = Avocado.build(TINY, vocab, data)
    monkeypatch.setattr(loop, "_torch_version", lambda: (2, 7))
    with pytest.raises(EpirayError, match=r"issue 150656.*loop.compile: false"):
        fit(model, data, LoopParams(epochs=1, batch_size=200, compile=True))


@pytest.mark.slow
def test_compiled_loss_trains_like_eager():
    """``compile: true`` on CPU (inductor; about 35 s of compilation)."""
    _, vocab, data = problem(n=600)
    params = LoopParams(epochs=2, batch_size=200, patience=None, restore_best=False)
    out = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = Avocado.build(TINY, vocab, data)
        st = fit(model, data, params.model_copy(update={"compile": compile_}))
        out.append(st.history[-1]["train_mse"])
    assert out[1] == pytest.approx(out[0], rel=1e-3)


def test_row_adam_equals_sparse_adam():
    torch.manual_seed(0)
    tabs = [torch.nn.Embedding(50, 3, sparse=True) for _ in range(2)]
    tabs[1].load_state_dict(tabs[0].state_dict())
    opts = [
        RowAdam(tabs[0].parameters(), lr=0.1),
        torch.optim.SparseAdam(tabs[1].parameters(), lr=0.1),
    ]
    for step in range(4):
        idx = torch.randint(0, 50, (30,), generator=torch.Generator().manual_seed(step))
        for tab, opt in zip(tabs, opts):
            (tab(idx) ** 2).sum().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(tabs[0].weight, tabs[1].weight, rtol=1e-6, atol=1e-7)
    dense = torch.nn.Parameter(torch.zeros(3, 2))
    dense.grad = torch.ones(3, 2)
    with pytest.raises(EpirayError, match="dense gradient"):
        RowAdam([dense]).step()


def test_cpu_bf16_autocast_trains():
    _, vocab, data = problem(n=600)
    torch.manual_seed(0)
    model = Avocado.build(TINY, vocab, data)
    state = fit(model, data, LoopParams(epochs=3, batch_size=200, lr=1e-2, autocast="bf16"))
    assert all(np.isfinite(h["train_mse"]) for h in state.history)
    assert state.history[-1]["train_mse"] < state.history[0]["train_mse"]


def test_errors_name_what_is_wrong(tmp_path):
    _, vocab, data = problem(n=300)
    model = Avocado.build(TINY, vocab, data)
    model.freeze({"network", "biosample", "assay", "genome"})
    with pytest.raises(ConfigError, match="every parameter is frozen"):
        fit(model, data, LoopParams(epochs=1))
    with pytest.raises(ValueError, match="extra"):
        LoopParams(epoch=3)
    bad = tmp_path / "rank0.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EpirayError, match=r"checkpoint .*rank0.pt: cannot read"):
        load_checkpoint(bad, data)
    path = save_checkpoint(tmp_path / "ok.pt", model, TrainState())
    summary = {"bin_size": 25, "assemblies": {}, "experiments": {}}
    with pytest.raises(StoreError, match="'e00' is not in the store"):
        load_checkpoint(path, data, store_summary=summary)


# ---------------------------------------------------------------------------------------------
# torch.distributed: two workers, each owning part of the bins
# ---------------------------------------------------------------------------------------------

EPOCHS, BATCH, LR = 30, 250, 1e-2


def _worker(rank: int, world: int, init: str, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        # unequal shards (900 and 1,100 bins): ranks run out of batches at different steps
        lo, hi = [(0, 900), (900, 2000)][rank]
        _, vocab, data = problem(n=2000, lo=lo, hi=hi)
        torch.manual_seed(100 + rank)  # different inits: the loop broadcasts rank 0's
        model = Avocado.build(TINY, vocab, data)
        params = LoopParams(epochs=EPOCHS, batch_size=BATCH // world, lr=LR, patience=6)
        state = fit(model, data, params)
        dense = torch.cat([p.detach().reshape(-1) for p in model.dense_parameters()])
        out[rank] = (state.best_val, dense.numpy().copy(), len(state.history))
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_reach_single_process_quality(tmp_path):
    t, vocab, data = problem(n=2000)
    torch.manual_seed(0)
    single = fit(
        Avocado.build(TINY, vocab, data),
        data,
        LoopParams(epochs=EPOCHS, batch_size=BATCH, lr=LR, patience=6),
    )
    aa = AverageActivity.fit(data, vocab)
    aa_mse = np.mean(
        [
            float(((aa.predict(data, b, a) - torch.from_numpy(t[b, a])) ** 2).mean())
            for b, a in TEST
        ]
    )
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, f"file://{tmp_path / 'pg'}", out), nprocs=2, join=True)
        out = dict(out)
    (val0, dense0, n0), (val1, dense1, n1) = out[0], out[1]
    assert val0 == val1 and n0 == n1  # the validation metric is global
    np.testing.assert_array_equal(dense0, dense1)  # dense parameters stay in sync
    assert single.best_val < 0.5 * aa_mse
    assert val0 < 0.5 * aa_mse and val0 < 1.5 * single.best_val, (val0, single.best_val, aa_mse)
