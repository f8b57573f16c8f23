"""Avocado, the model contract (vocabulary, registry, ChromData) and the average-activity
baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from epiray.errors import ConfigError, EpirayError, StoreError
from epiray.loop import LoopParams, RowAdam, fit
from epiray.models import (
    ChromData,
    Vocabulary,
    available_models,
    chrom_data_from_numpy,
    get_model,
)
from epiray.models.avocado import Avocado, AvocadoParams
from epiray.models.baselines import AverageActivity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PILOT = Path(__file__).resolve().parents[2] / "shared/data/roadmap-pilot"
TINY = {
    "n_nodes": 32,
    "n_assay_factors": 8,
    "n_biosample_factors": 4,
    "n_genome_factors": (4, 4, 4),
}


def lowrank(nb: int, na: int, n: int, seed: int = 0, rank: int = 3) -> np.ndarray:
    """A positive rank-3 tensor ``[nb, na, n]`` with 10-bin structure (softplus of B·A·G)."""
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(nb, rank))
    a = rng.normal(size=(na, rank))
    g = np.repeat(rng.normal(size=(rank, -(-n // 10))), 10, 1)[:, :n]
    g = g + 0.5 * rng.normal(size=(rank, n))
    return np.log1p(np.exp(np.einsum("bk,ak,kn->ban", b, a, g) / 2)).astype(np.float32)


def make_problem(n=2000, nb=5, na=4, test=((0, 0), (3, 2)), lo=0, hi=None, seed=0):
    """Low-rank tensor, vocabulary and a ChromData holding out ``test`` as validation."""
    t = lowrank(nb, na, n, seed)
    pairs = [(b, a) for b in range(nb) for a in range(na)]
    train = [p for p in pairs if p not in test]
    vocab = Vocabulary.from_records(
        [(f"e{b}{a}", f"b{b}", f"a{a}", "mouse") for b, a in pairs], chrom="chrT", n_bins=n
    )
    data = chrom_data_from_numpy(
        np.stack([t[b, a] for b, a in train]),
        [b for b, _ in train],
        [a for _, a in train],
        chrom="chrT",
        lo=lo,
        hi=hi if hi is not None else n,
        n_bins=n,
        device="cpu",
        val_values=np.stack([t[b, a] for b, a in test]),
        val_biosample=[b for b, _ in test],
        val_assay=[a for _, a in test],
    )
    return t, vocab, data, train


def aux_problem(n=400, h_tracks=3, seed=1):
    """Target data plus an 'other species' block: 3 human tracks at 300 alignment rows."""
    rng = np.random.default_rng(seed)
    records = [(f"m{i}", f"mb{i % 2}", f"a{i // 2}", "mouse") for i in range(4)]
    records += [(f"h{i}", f"hb{i}", f"a{i % 2}", "human") for i in range(h_tracks)]
    vocab = Vocabulary.from_records(records, chrom="chrM1", n_bins=n)
    bi = {b: i for i, b in enumerate(vocab.biosamples)}
    ai = {a: i for i, a in enumerate(vocab.assays)}
    rows = 300
    aux_bin = np.sort(rng.integers(0, n, rows))
    human_bin = rng.permutation(10_000)[:120]  # 120 distinct human positions
    aux_pos = rng.integers(0, 120, rows)
    aux_pos[:120] = np.arange(120)
    values_h = rng.random((h_tracks, 120)).astype(np.float32)
    data = chrom_data_from_numpy(
        rng.random((4, n)).astype(np.float32),
        [bi[r[1]] for r in records[:4]],
        [ai[r[2]] for r in records[:4]],
        chrom="chrM1",
        device="cpu",
        aux_values=values_h[:, aux_pos],
        aux_bin=aux_bin,
        aux_pos=aux_pos,
        aux_pos_chrom=np.zeros(120, np.int64),
        aux_pos_bin=human_bin,
        aux_biosample=[bi[r[1]] for r in records[4:]],
        aux_assay=[ai[r[2]] for r in records[4:]],
    )
    return vocab, data


# ---------------------------------------------------------------------------------------------
# contract
# ---------------------------------------------------------------------------------------------


def test_registry_finds_avocado_and_rejects_unknown():
    assert get_model("avocado") is Avocado
    assert "avocado" in available_models()
    with pytest.raises(ConfigError, match="unknown model 'avocadoo'"):
        get_model("avocadoo")


def test_vocabulary_round_trip_and_store_check():
    _, vocab, _, _ = make_problem(n=100)
    vocab = Vocabulary(**{**vocab.__dict__, "assembly": "mm10", "checksums": {"e00": "abc"}})
    again = Vocabulary.from_dict(vocab.to_dict())
    assert again == vocab
    summary = {
        "bin_size": 25,
        "assemblies": {"mm10": {"species": "mouse", "chrom_sizes": {"chrT": 2500}}},
        "experiments": {
            f"e{b}{a}": {"biosample": f"b{b}", "assay": f"a{a}", "species": "mouse"}
            for b in range(5)
            for a in range(4)
        },
    }
    summary["experiments"]["e00"]["checksum"] = "abc"
    vocab.check_matches(summary)
    summary["experiments"]["e00"]["checksum"] = "changed"
    summary["experiments"]["e13"]["assay"] = "a0"
    del summary["experiments"]["e21"]
    summary["assemblies"]["mm10"]["chrom_sizes"]["chrT"] = 2600
    with pytest.raises(StoreError, match="4 problem") as err:
        vocab.check_matches(summary)
    msg = str(err.value)
    assert "'e21' is not in the store" in msg and "checksum changed" in msg
    assert "expected 100 bins, got 104" in msg and "'e13'" in msg


def test_vocabulary_extend_keeps_indices():
    _, vocab, _, _ = make_problem(n=100)
    new = vocab.extend([("x1", "bNEW", "a1", "mouse"), ("x2", "b0", "aNEW", "mouse")])
    assert new.biosamples[: len(vocab.biosamples)] == vocab.biosamples
    assert new.biosample_index("bNEW") == len(vocab.biosamples)
    assert new.experiments["x2"] == (0, len(vocab.assays), "mouse")
    with pytest.raises(EpirayError, match="unknown assay 'nope'"):
        new.assay_index("nope")
    with pytest.raises(EpirayError, match="'x1' already present"):
        new.extend([("x1", "b0", "a0", "mouse")])


def test_chrom_data_validates_shapes():
    with pytest.raises(EpirayError, match=r"values has shape \(2, 5\); expected \[E, 4\]"):
        ChromData("c", 0, 4, 4, torch.zeros(2, 5), torch.zeros(2).long(), torch.zeros(2).long())
    with pytest.raises(EpirayError, match="bad bin range"):
        ChromData("c", 3, 2, 4, torch.zeros(2, 5), torch.zeros(2).long(), torch.zeros(2).long())
    whole = np.arange(20, dtype=np.float32).reshape(2, 10)
    d = chrom_data_from_numpy(whole, [0, 1], [0, 0], lo=4, hi=8, n_bins=10, device="cpu")
    assert d.values.tolist() == whole[:, 4:8].tolist() and d.n_local == 4


# ---------------------------------------------------------------------------------------------
# Avocado
# ---------------------------------------------------------------------------------------------


def test_paper_sizes_and_parameter_counts():
    n = 12_345
    _, vocab, data, _ = make_problem(n=n)
    model = Avocado.build(AvocadoParams(), vocab, data)
    counts = model.n_parameters()
    assert counts["genome"] == n * 25 + (-(-n // 10)) * 40 + (-(-n // 200)) * 45
    assert counts["factors"] == 5 * 32 + 4 * 256
    inputs = 32 + 256 + 25 + 40 + 45
    assert model.hidden[0].weight.shape == (2048, inputs)
    assert counts["network"] == (inputs + 1) * 2048 + 2049 * 2048 + 2049
    assert sum(p.numel() for p in model.parameters()) == sum(counts.values())
    # every parameter is either dense (all-reduced) or sparse (worker-local), never both
    dense = {id(p) for p in model.dense_parameters()}
    sparse = {id(p) for p in model.sparse_parameters()}
    assert not dense & sparse and dense | sparse == {id(p) for p in model.parameters()}


def test_slab_offsets_coarse_rows():
    # a worker owning [195, 1005) of the chromosome: 5 kbp rows 0..5 globally -> 0..5 locally
    _, vocab, data, _ = make_problem(n=2000, lo=195, hi=1005)
    model = Avocado.build(AvocadoParams(**TINY), vocab, data)
    assert [t.num_embeddings for t in model.genome] == [810, (1004 // 10) - 19 + 1, 6]
    g = model._genome_inputs(torch.tensor([0, 4, 5, 809]))
    w250, w5k = model.genome[1].weight, model.genome[2].weight
    assert torch.equal(g[0, 4:8], w250[0]) and torch.equal(g[1, 4:8], w250[0])
    assert torch.equal(g[2, 4:8], w250[1]) and torch.equal(g[3, 8:], w5k[5])
    assert torch.equal(g[0, 8:], w5k[0]) and torch.equal(g[2, 8:], w5k[1])


def test_predict_equals_the_concatenating_network():
    _, vocab, data, _ = make_problem(n=300)
    model = Avocado.build(AvocadoParams(**TINY, predict_batch_size=128), vocab, data)
    out = model.predict(data, 2, 3)
    bins = torch.arange(300)
    x = torch.cat(
        [
            model.biosample_factors[0][2].expand(300, -1),
            model.assay_factors[0][3].expand(300, -1),
            model.genome[0](bins),
            model.genome[1](bins // 10),
            model.genome[2](bins // 200),
        ],
        1,
    )
    h = x
    for lin in model.hidden:
        h = F.relu(lin(h))
    torch.testing.assert_close(out, model.out(h).squeeze(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("autocast", [False, True])
def test_training_forward_and_gradients_equal_the_concatenating_network(autocast):
    """The training path (distinct pair rows gathered per example, the product added in
    place, the output layer as a matrix-vector product) is the paper's network, gradients
    included; under autocast it takes the plain path."""
    _, vocab, data, _ = make_problem(n=300)
    model = Avocado.build(AvocadoParams(**TINY), vocab, data)
    gen = torch.Generator().manual_seed(1)
    bins = torch.randint(300, (64,), generator=gen)
    b = torch.randint(5, (64,), generator=gen)
    a = torch.randint(4, (64,), generator=gen)
    y = torch.randn(64, generator=gen)
    dense = [model.hidden[0].weight, model.hidden[0].bias, model.out.weight, model.out.bias]
    dense += [model.hidden[-1].weight]

    def grads(loss):
        for p in dense:
            p.grad = None
        loss.backward()
        return [p.grad.clone() for p in dense]

    uniq, inv = torch.unique(b * 10 + a, return_inverse=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        pair = model._pair_inputs(uniq // 10, uniq % 10)
        pred = model(model._genome_inputs(bins), pair, inv)
    ours = grads(F.mse_loss(pred.float(), y))
    x = torch.cat(
        [
            model.biosample_factors[0][b],
            model.assay_factors[0][a],
            model.genome[0](bins),
            model.genome[1](bins // 10),
            model.genome[2](bins // 200),
        ],
        1,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h = x
        for lin in model.hidden:
            h = F.relu(lin(h))
        ref = model.out(h).squeeze(1)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(pred.float(), ref.float(), **tol)
    for got, want in zip(ours, grads(F.mse_loss(ref.float(), y))):
        torch.testing.assert_close(got, want, **tol)


def test_predict_many_and_embeddings_follow_the_vocabulary():
    _, vocab, data, _ = make_problem(n=300)
    model = Avocado.build(AvocadoParams(**TINY), vocab, data).eval()
    with torch.no_grad():
        many = model.predict_many(data, [(2, 3), (0, 1)])
        assert many.shape == (2, 300)
        torch.testing.assert_close(many[0], model.predict(data, 2, 3))
        torch.testing.assert_close(many[1], model.predict(data, 0, 1))
        assert model.predict_many(data, []).shape == (0, 300)
    bio, assay = model.embeddings()
    assert bio.shape == (len(vocab.biosamples), TINY["n_biosample_factors"])
    assert torch.equal(bio[2], model.biosample_factors[0][2].detach())
    assert torch.equal(assay[3], model.assay_factors[0][3].detach())


def test_batches_visit_every_bin_once_with_observed_values():
    _, vocab, data, _ = make_problem(n=1000)
    model = Avocado.build(AvocadoParams(**TINY), vocab, data)
    gen = torch.Generator().manual_seed(0)
    batches = list(model.batches(data, gen, 300))
    assert [b.size for b in batches] == [300, 300, 300, 100]
    bins = torch.cat([b.tensors["bin"] for b in batches])
    assert torch.equal(bins.sort().values, torch.arange(1000))
    for b in batches:
        t = b.tensors
        assert torch.equal(t["y"], data.values[t["pair"], t["bin"]])
    pairs = torch.cat([b.tensors["pair"] for b in batches])
    assert set(pairs.tolist()) == set(range(data.n_experiments))  # uniform over tracks
    again = list(model.batches(data, torch.Generator().manual_seed(0), 300))
    assert torch.equal(again[0].tensors["bin"], batches[0].tensors["bin"])


@pytest.mark.parametrize("optimizer", [RowAdam, torch.optim.SparseAdam])
def test_sparse_update_touches_only_batch_rows(optimizer):
    _, vocab, data, _ = make_problem(n=4000)
    model = Avocado.build(AvocadoParams(**TINY), vocab, data)
    before = [p.detach().clone() for p in model.sparse_parameters()]
    opt = optimizer(model.sparse_parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    it = model.batches(data, gen, 100)
    used = torch.zeros(4000, dtype=torch.bool)
    for _ in range(3):
        batch = next(it)
        used[batch.tensors["bin"]] = True
        model.loss(batch).backward()
        opt.step()
        opt.zero_grad()
    rows = [used, torch.zeros(400, dtype=torch.bool), torch.zeros(20, dtype=torch.bool)]
    rows[1][used.nonzero().squeeze(1) // 10] = True
    rows[2][used.nonzero().squeeze(1) // 200] = True
    for p, b, r in zip(model.sparse_parameters(), before, rows):
        assert torch.equal(p[~r], b[~r]), "a row outside the batches changed"
        assert (p[r] != b[r]).all(1).all(), "a batch row did not move"
        st = opt.state[p]
        assert (st["exp_avg"][~r] == 0).all() and (st["exp_avg_sq"][~r] == 0).all()
        assert (st["exp_avg_sq"][r] > 0).all(1).all()


def test_fits_a_low_rank_tensor_far_better_than_average_activity():
    torch.manual_seed(0)
    t, vocab, data, train = make_problem(n=2000)
    model = Avocado.build(AvocadoParams(**TINY), vocab, data)
    state = fit(model, data, LoopParams(epochs=30, batch_size=250, lr=1e-2, patience=6))
    aa = AverageActivity.fit(data, vocab)
    aa_mse = np.mean(
        [
            float(((aa.predict(data, b, a) - torch.from_numpy(t[b, a])) ** 2).mean())
            for b, a in [(0, 0), (3, 2)]
        ]
    )
    model_mse = np.mean(
        [
            float(((model.predict(data, b, a) - torch.from_numpy(t[b, a])) ** 2).mean())
            for b, a in [(0, 0), (3, 2)]
        ]
    )
    assert model_mse == pytest.approx(state.best_val, rel=1e-4)  # best state restored
    assert model_mse < 0.5 * aa_mse, (model_mse, aa_mse)


def test_biosample_shrinkage_penalises_what_a_biosample_changes_in_the_network():
    _, vocab, data, _ = make_problem(n=300)
    torch.manual_seed(0)
    plain = Avocado.build(AvocadoParams(**TINY), vocab, data)
    assert plain.penalty() is None  # the paper: no penalty
    model = Avocado.build(AvocadoParams(**TINY, biosample_shrinkage=0.3), vocab, data)
    b = model.biosample_factors[0].detach()
    w = model.hidden[0].weight.detach()[:, : b.shape[1]]
    want = 0.3 * np.mean([float(((w @ (bi - b.mean(0))) ** 2).sum()) for bi in b])
    assert float(model.penalty()) == pytest.approx(want, rel=1e-5)
    # the network cannot undo it by scaling: factors × 4 and their weights / 4 change nothing
    before = model.predict(data, 2, 3)
    with torch.no_grad():
        model.biosample_factors[0].mul_(4.0)
        model.hidden[0].weight[:, : b.shape[1]].div_(4.0)
    assert float(model.penalty()) == pytest.approx(want, rel=1e-4)
    torch.testing.assert_close(model.predict(data, 2, 3), before, rtol=1e-5, atol=1e-6)


def test_strong_biosample_shrinkage_makes_every_biosample_look_alike():
    _, vocab, data, _ = make_problem(n=1000)
    spread = {}
    for lam in (0.0, 100.0):
        torch.manual_seed(0)
        model = Avocado.build(AvocadoParams(**TINY, biosample_shrinkage=lam), vocab, data)
        fit(model, data, LoopParams(epochs=15, batch_size=250, lr=1e-2, patience=None))
        with torch.no_grad():
            assay0 = torch.stack([model.predict(data, b, 0) for b in range(5)])
        spread[lam] = float(assay0.var(0).mean())
    # shrunk hard, biosample 0's held-out assay-0 track is what the others show for assay 0
    assert spread[100.0] < 1e-3 * spread[0.0], spread


def test_cross_species_batches_are_half_human_through_the_alignment():
    vocab, data = aux_problem()
    model = Avocado.build(AvocadoParams(**TINY, variant="cross_species"), vocab, data)
    assert model.aux_genome is None and model.genome[0].num_embeddings == 400
    batches = list(model.batches(data, torch.Generator().manual_seed(0), 100))
    assert len(batches) == 8  # 400 target bins, 50 per batch
    e = data.n_experiments
    for b in batches:
        t = b.tensors
        k = int(t["n_target"])
        assert b.size == 100 and k == 50
        assert (t["pair"][:k] < e).all() and (t["pair"][k:] >= e).all()
        # a human example's bin is the target bin of its alignment row, its value the human one
        human = t["pair"][k:] - e
        rows = [
            np.flatnonzero((data.aux_bin.numpy() == bb) & (data.aux_values[h].numpy() == yy)).size
            for bb, h, yy in zip(t["bin"][k:].tolist(), human.tolist(), t["y"][k:].tolist())
        ]
        assert min(rows) >= 1
        assert torch.equal(t["pair_biosample"][t["pair"][k:]], data.aux_biosample[human])
    state = fit(model, data, LoopParams(epochs=3, batch_size=100, patience=None))
    assert state.history[-1]["train_mse"] < state.history[0]["train_mse"]


def test_a_slab_no_alignment_row_reaches_trains_on_target_examples_only():
    vocab, data = aux_problem()
    empty = ChromData(
        **{
            **data.__dict__,
            "aux_values": data.aux_values[:, :0],
            "aux_bin": data.aux_bin[:0],
            "aux_pos": data.aux_pos[:0],
        }
    )
    model = Avocado.build(AvocadoParams(**TINY, variant="cross_species"), vocab, empty)
    batches = list(model.batches(empty, torch.Generator().manual_seed(0), 100))
    assert [int(b.tensors["n_target"]) for b in batches] == [100] * 4


def test_concat_gives_other_species_positions_their_own_factors():
    vocab, data = aux_problem()
    model = Avocado.build(AvocadoParams(**TINY, variant="concat"), vocab, data)
    assert model.aux_genome[0].num_embeddings == 120
    # coarse rows from the human bins themselves, not from the aligned mouse bins
    hb = data.aux_pos_bin
    assert model.aux_genome[1].num_embeddings == torch.unique(hb // 10).numel()
    same = (hb[:, None] // 200 == hb[None, :] // 200).float()
    grp = model.aux_group_5k
    assert torch.equal((grp[:, None] == grp[None, :]).float(), same)
    batch = next(model.batches(data, torch.Generator().manual_seed(0), 100))
    t = batch.tensors
    k = int(t["n_target"])
    assert (t["bin"][k:] < 120).all()
    # a human-only loss moves human factors and leaves the mouse genome factors alone
    human_only = type(batch)(
        100 - k,
        {
            **t,
            "bin": t["bin"][k:],
            "pair": t["pair"][k:],
            "y": t["y"][k:],
            "n_target": torch.tensor(0),
        },
    )
    model.loss(human_only).backward()
    assert all(tab.weight.grad is None for tab in model.genome)
    assert all(tab.weight.grad is not None for tab in model.aux_genome)


def test_variants_need_the_other_species():
    _, vocab, data, _ = make_problem(n=100)
    with pytest.raises(EpirayError, match="no other-species tracks"):
        Avocado.build(AvocadoParams(**TINY, variant="cross_species"), vocab, data)
    with pytest.raises(ConfigError, match="cannot freeze"):
        Avocado.build(AvocadoParams(**TINY), vocab, data).freeze({"genome", "everything"})
    with pytest.raises(ValueError, match="extra"):
        AvocadoParams(n_nodes=8, hidden=3)


def test_predict_rejects_another_slab():
    _, vocab, data, _ = make_problem(n=1000, lo=0, hi=500)
    _, _, other, _ = make_problem(n=1000, lo=500, hi=1000)
    model = Avocado.build(AvocadoParams(**TINY), vocab, data)
    with pytest.raises(
        EpirayError, match=r"data covers bins \[500, 1000\); expected .*\[0, 500\)"
    ):
        model.predict(other, 0, 0)


def test_transfer_to_another_chromosome_fits_only_genome_factors():
    torch.manual_seed(0)
    t, vocab, data, _ = make_problem(n=600)
    model = Avocado.build(AvocadoParams(**TINY), vocab, data)
    state = fit(model, data, LoopParams(epochs=2, batch_size=200, patience=None))
    _, _, data2, _ = make_problem(n=800, seed=5)
    new = Avocado.transfer(model, data2)
    assert new.vocab.chrom == "chrT" and new.genome[0].num_embeddings == 800
    dense_before = [p.detach().clone() for p in new.dense_parameters()]
    genome_before = [p.detach().clone() for p in new.sparse_parameters()]
    loop = LoopParams(epochs=2, batch_size=200, patience=None, restore_best=False)
    # the first chromosome's genome moments do not fit the new rows: refused, not misread
    moved = r"chrT bins \[0, 800\).*'genome\.0\.weight' has shape \(600, 4\).*keep_sparse=False"
    with pytest.raises(EpirayError, match=moved):
        fit(new, data2, loop, start_state=state.for_new_phase())
    state2 = fit(new, data2, loop, start_state=state.for_new_phase(keep_sparse=False))
    # the frozen network's moments are carried for later phases, the genome's are new
    for k, v in state.dense_opt.items():
        assert torch.equal(state2.dense_opt[k]["exp_avg"], v["exp_avg"]), k
    assert state2.sparse_opt["genome.0.weight"]["exp_avg"].shape == (800, 4)
    for p, b, q in zip(new.dense_parameters(), dense_before, model.dense_parameters()):
        assert torch.equal(p, b) and torch.equal(p, q)
    assert all(not torch.equal(p, b) for p, b in zip(new.sparse_parameters(), genome_before))


def test_new_biosample_fits_only_its_factors_and_is_saved(tmp_path):
    from epiray.loop import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    t, vocab, data, train = make_problem(n=600, nb=4)
    model = Avocado.build(AvocadoParams(**TINY), vocab, data)
    state = fit(model, data, LoopParams(epochs=2, batch_size=200, patience=None))
    adam_before = {k: v["exp_avg"].clone() for k, v in state.dense_opt.items()}
    # a new biosample observed for assay 1 only
    t_new = lowrank(1, 4, 600, seed=9)[0]
    vocab2 = vocab.extend([("eNEW1", "bNEW", "a1", "mouse")])
    model.extend(vocab2)
    data2 = chrom_data_from_numpy(
        t_new[1:2], [vocab2.biosample_index("bNEW")], [1], chrom="chrT", device="cpu"
    )
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    state2 = fit(
        model,
        data2,
        LoopParams(epochs=3, batch_size=200, patience=None),
        start_state=state.for_new_phase(),
    )
    for n, p in model.named_parameters():
        if n == "biosample_factors.1":
            assert p.shape == (1, 4) and not torch.equal(p, frozen[n])
        else:
            assert torch.equal(p, frozen[n]), n
    # the old parameters' Adam moments are kept, the new rows have their own
    for k, v in adam_before.items():
        assert torch.equal(state2.dense_opt[k]["exp_avg"], v)
    assert "biosample_factors.1" in state2.dense_opt
    path = save_checkpoint(tmp_path / "rank0.pt", model, state2)
    again, state3 = load_checkpoint(path, data2)
    assert again.vocab.biosamples[-1] == "bNEW" and state3.epoch == 3
    torch.testing.assert_close(
        again.predict(data2, vocab2.biosample_index("bNEW"), 1), model.predict(data2, 4, 1)
    )


# ---------------------------------------------------------------------------------------------
# average activity
# ---------------------------------------------------------------------------------------------


def test_average_activity_is_the_per_assay_mean_of_training_tracks():
    t, vocab, data, train = make_problem(n=300)
    aa = AverageActivity.fit(data, vocab)
    want = np.mean([t[b, 2] for b, a in train if a == 2], 0)
    np.testing.assert_allclose(aa.predict(data, 3, 2).numpy(), want, rtol=1e-6)
    assert torch.equal(aa.predict(data, 0, 2), aa.predict(data, 4, 2))  # biosample ignored
    only = chrom_data_from_numpy(t[0, :2], [0, 1], [0, 0], chrom="chrT", device="cpu")
    with pytest.raises(EpirayError, match="assay 'a3' has no training experiment"):
        AverageActivity.fit(only, vocab).predict(only, 0, 3)


@pytest.mark.skipif(not PILOT.is_dir(), reason="shared/data/roadmap-pilot absent")
def test_average_activity_on_real_roadmap_pilot_matches_reference():
    """README figures: E065 H3K4me3 MSE 0.158 (Pearson 0.615), E017 H3K4me3 0.129 (0.849)."""
    cells = ["E003", "E017", "E065", "E116", "E117"]
    tracks = np.stack([np.load(PILOT / f"{c}.H3K4me3.pilot.arcsinh.npz")["arr_0"] for c in cells])
    for target, mse_ref, r_ref in [("E065", 0.158, 0.615), ("E017", 0.129, 0.849)]:
        i = cells.index(target)
        keep = [j for j in range(5) if j != i]
        data = chrom_data_from_numpy(tracks[keep], keep, [0] * 4, device="cpu")
        pred = AverageActivity.fit(data).predict(data, i, 0).numpy()
        assert np.mean((pred - tracks[i]) ** 2) == pytest.approx(mse_ref, abs=5e-4)
        assert np.corrcoef(pred, tracks[i])[0, 1] == pytest.approx(r_ref, abs=5e-4)
