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


# ------------------------------------------------------------------ regime and validation cells
class _Sized:
    """The parts of a model :func:`epiray.loop.regime` reads."""

    name = "sized"
    max_batch_size = 40_000

    def __init__(self, per_bin: int = 1) -> None:
        self.per_bin = per_bin

    def epoch_examples(self, data):
        return data.n_local * self.per_bin

    def steps_per_epoch(self, data, batch_size):
        return -(-self.epoch_examples(data) // batch_size)


def _slab(n_bins: int):
    from types import SimpleNamespace

    return SimpleNamespace(n_local=n_bins, chrom="chrT", lo=0, hi=n_bins, n_experiments=30)


def test_auto_batch_gives_every_slab_enough_steps():
    from epiray.loop import regime

    p = LoopParams(epochs=100)  # batch_size: auto, 64 steps per epoch
    small, large = regime(p, _Sized(), _slab(25_000)), regime(p, _Sized(), _slab(7_800_000))
    assert small.batch_size == 391 and small.steps_per_epoch == 64
    assert large.batch_size == 40_000 and large.steps_per_epoch == 195  # the paper's batch caps
    assert small.warning is None and large.warning is None
    assert regime(p, _Sized(per_bin=8), _slab(25_000)).batch_size == 3125  # eDICE: 8 per bin
    # the original package's batch on the small worker: one step per epoch, warned
    paper = regime(LoopParams(epochs=30, batch_size=40_000), _Sized(), _slab(25_000))
    assert paper.steps_per_epoch == 1 and paper.max_steps == 30
    assert "at most 30 optimiser steps" in paper.warning and "batch_size: auto" in paper.warning
    tiny = regime(LoopParams(epochs=5), _Sized(), _slab(1000))
    assert tiny.batch_size == 256 and "Raise train.steps_per_epoch" in tiny.warning


def test_fit_uses_the_auto_batch_and_logs_the_regime(caplog):
    _, vocab, data = problem(n=4000)
    torch.manual_seed(0)
    model = Avocado.build(TINY, vocab, data)
    with caplog.at_level("INFO", logger="epiray.loop"):
        state = fit(model, data, LoopParams(epochs=2, patience=None, min_steps=10))
    assert state.regime["batch_size"] == 256 and state.regime["steps_per_epoch"] == 16
    assert state.history[0]["examples"] == 4000
    assert "batch 256, 16 steps per epoch" in caplog.text
    assert "epoch 2/2: train" in caplog.text


def _cells_problem(n=2000, fraction=0.2):
    from epiray.folds import heldout_blocks

    t, vocab, data = problem(n=n)
    train = [(b, a) for b in range(5) for a in range(4) if (b, a) not in TEST]
    mask = heldout_blocks([f"e{b}{a}" for b, a in train], "chrT", n, 0, n, fraction, 100)
    data.heldout = torch.from_numpy(mask)
    data.heldout_block = 100
    data.val_values = data.val_biosample = data.val_assay = None
    return t, vocab, data


def test_validation_cells_are_never_trained_on():
    """Changing the values of the held-out cells changes neither a batch's loss nor its
    gradients: they are there with weight 0."""
    _, vocab, data = _cells_problem()
    torch.manual_seed(0)
    model = Avocado.build(TINY, vocab, data)
    gen = torch.Generator().manual_seed(1)
    batch = next(iter(model.batches(data, gen, 500)))
    held = data.is_heldout(batch.tensors["pair"], batch.tensors["bin"])
    assert held.any() and not held.all()
    assert torch.equal(batch.tensors["w"], (~held).float())
    loss = model.loss(batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.hidden.parameters()]
    model.zero_grad()
    batch.tensors["y"] = torch.where(held, batch.tensors["y"] + 100.0, batch.tensors["y"])
    loss2 = model.loss(batch)
    loss2.backward()
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
    for g, p in zip(grads, model.hidden.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_validate_scores_every_held_out_cell():
    from epiray.loop import validate

    _, vocab, data = _cells_problem()
    torch.manual_seed(0)
    model = Avocado.build(TINY, vocab, data)
    track, bins = data.heldout_cells()
    assert len(track) == data.n_heldout_cells > 0
    want = 0.0
    for t in torch.unique(track).tolist():
        full = model.predict(data, int(data.biosample[t]), int(data.assay[t]))
        sel = bins[track == t]
        want += float(((full[sel] - data.values[t, sel].float()) ** 2).sum())
    out = validate(model, data, LoopParams(autocast="off"))
    assert out["val_cells"] == len(track)
    assert out["val_mse"] == pytest.approx(want / len(track), rel=1e-5)
    assert "val_mse_tracks" not in out


def test_plateau_schedule_lowers_the_rate_on_plateaus():
    _, vocab, data = _cells_problem(n=1000)
    torch.manual_seed(0)
    model = Avocado.build(TINY, vocab, data)
    rates = []
    params = LoopParams(
        epochs=9,
        lr=1e-9,  # nothing improves after the first epoch
        min_delta=1.0,
        patience=None,
        lr_schedule="plateau",
        plateau_patience=2,
        autocast="off",
        min_steps=1,
    )
    state = fit(model, data, params, callback=lambda s, m: rates.append(m["lr"]))
    assert state.lr_drops == 4
    assert rates == pytest.approx([1e-9] * 3 + [5e-10] * 2 + [2.5e-10] * 2 + [1.25e-10] * 2)
    # a refit (no validation, so no plateau is ever met) replays the rates when given the plan
    data.heldout = None
    again = fit(
        Avocado.build(TINY, vocab, data),
        data,
        params,
        start_state=TrainState(phase="refit", lr_plan=[r / 1e-9 for r in rates[:6]]),
    )
    assert again.lr_drops == 0
    assert [h["lr"] for h in again.history] == pytest.approx(rates[:6] + [rates[5]] * 3)
    plain = fit(Avocado.build(TINY, vocab, data), data, params.model_copy(update={"epochs": 2}))
    assert [h["lr"] for h in plain.history] == [1e-9, 1e-9]  # without a plan: constant
