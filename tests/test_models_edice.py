"""eDICE: shapes and size, masking, fitting, transfer learning, cross-species support."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch

from epiray.errors import ConfigError, EpirayError, InputDataError
from epiray.models import Vocabulary, chrom_data_from_numpy, get_model
from epiray.models.edice import (
    EDice,
    EDiceNet,
    EDiceParams,
    SignalEmbedder,
    build_slots,
    select_targets,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread_seeded")

SMALL = dict(dim=16, heads=4, ffn_hidden=16, mlp_hidden=32, attention_dropout=0.0, mlp_dropout=0.0)


def grid_vocab(nb: int, na: int, species: str = "human", prefix: str = "b") -> Vocabulary:
    recs = [
        (f"{prefix}{i}.a{j}", f"{prefix}{i}", f"a{j}", species)
        for i in range(nb)
        for j in range(na)
    ]
    return Vocabulary.from_records(recs, chrom="chr1", n_bins=1)


def low_rank(nb: int, na: int, n: int, seed: int = 0) -> np.ndarray:
    """``[nb, na, n]`` arcsinh of a non-negative rank-3 tensor (peaky genome factors)."""
    rng = np.random.default_rng(seed)
    b = rng.gamma(1.0, size=(nb, 3))
    a = rng.gamma(1.0, size=(na, 3))
    g = rng.gamma(0.3, size=(3, n))
    return np.arcsinh(4 * np.einsum("bk,ak,kn->ban", b, a, g)).astype(np.float32)


def make_data(y: np.ndarray, pairs: list[tuple[int, int]], **kw):
    return chrom_data_from_numpy(
        np.stack([y[i, j] for i, j in pairs]),
        [i for i, _ in pairs],
        [j for _, j in pairs],
        chrom="chr1",
        device="cpu",
        **kw,
    )


def train(model: EDice, data, steps: int, lr: float = 1e-3, bins: int = 128) -> list[float]:
    opt = torch.optim.Adam([p for p in model.dense_parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(1)
    losses: list[float] = []
    model.train()
    while len(losses) < steps:
        for batch in model.batches(data, gen, bins * model.targets_per_bin(data)):
            loss = model.loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    return losses


# -- sizes and shapes ----------------------------------------------------------------------


def test_paper_sizes_parameter_count_and_shapes():
    # Roadmap: 127 biosamples x 24 assays. Signal layers 24->256 and 127->256, global tables,
    # two SABs (4 x 256^2 projections + 256->128->256 FFN), MLP 512->2048->2048->1.
    vocab = grid_vocab(127, 24)
    rng = np.random.default_rng(0)
    pairs = [(i, j) for i in range(127) for j in range(24) if rng.random() < 0.27]
    y = rng.random((127, 24, 8), dtype=np.float32)
    data = make_data(y, pairs)
    model = get_model("edice").build(EDiceParams(), vocab, data)
    assert isinstance(model, EDice)
    d, h = 256, 2048
    signal = (24 * d + d) + (127 * d + d)
    tables = (127 + 24) * d
    sab = 2 * (4 * (d * d + d) + (d * 128 + 128) + (128 * d + d))
    mlp = (2 * d * h + h) + (h * h + h) + (h + 1)
    assert model.n_parameters() == signal + tables + sab + mlp == 5_985_025
    assert model.dense_parameters() == list(model.parameters())
    assert model.sparse_parameters() == []

    assert model.targets_per_bin(data) == 120
    batch = next(model.batches(data, torch.Generator().manual_seed(0), 4 * 120 + 7))
    t = batch.tensors
    assert batch.size == 4 * 120
    assert t["values"].shape == (4, len(pairs)) and t["values"].dtype == torch.float32
    assert t["target"].shape == (4, 120) and t["valid"].all()
    loss = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    out = model.predict(data, 0, 0)
    assert out.shape == (8,) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_params_validation():
    assert EDiceParams().n_targets == 120
    assert EDiceParams(n_targets=0.25).n_targets == 0.25
    assert EDice.default_lr == 3e-4
    with pytest.raises(pydantic.ValidationError, match="fraction"):
        EDiceParams(n_targets=1.5)
    with pytest.raises(pydantic.ValidationError, match="count"):
        EDiceParams(n_targets=0)
    with pytest.raises(pydantic.ValidationError, match="divisible"):
        EDiceParams(dim=30, heads=4)
    with pytest.raises(pydantic.ValidationError, match="extra"):
        EDiceParams(embed_dim=3)


# -- building blocks -----------------------------------------------------------------------


@pytest.mark.parametrize("max_padding", [float("inf"), 0.0], ids=["padded", "flat"])
def test_slot_embedder_equals_dense_formulation(max_padding):
    # h_c = ReLU(W y_c) + u_c with y_c the row of the biosample x assay matrix / N_c.
    nb, na, b = 4, 3, 5
    pairs = [(0, 0), (0, 2), (1, 1), (2, 0), (2, 1), (2, 2)]  # biosample 3 never observed
    bio = torch.tensor([p[0] for p in pairs])
    assay = torch.tensor([p[1] for p in pairs])
    emb = SignalEmbedder(nb, na, 8)
    values = torch.randn(b, len(pairs))
    support = torch.rand(b, len(pairs)) < 0.6
    pad = torch.zeros(b, 1)
    vp = torch.cat([values * support, pad], 1)
    sp = torch.cat([support, pad.bool()], 1)
    slots = build_slots(bio, assay, nb, max_padding=max_padding)
    assert slots.padded == (max_padding > 0)
    h, observed = emb(vp, sp, slots)

    dense = torch.zeros(b, nb, na)
    mask = torch.zeros(b, nb, na)
    dense[:, bio, assay] = values * support
    mask[:, bio, assay] = support.float()
    n = mask.sum(-1, keepdim=True)
    y = dense / n.clamp(min=1)
    want = torch.relu(y @ emb.signal.weight.t() + emb.signal.bias) + emb.global_embedding
    torch.testing.assert_close(h, want)
    assert torch.equal(observed, n[..., 0] > 0)
    assert not observed[:, 3].any()
    # gradients reach the signal weights the same way in both layouts
    h.sum().backward()
    grad = emb.signal.weight.grad.clone()
    emb.signal.weight.grad = None
    want.sum().backward()
    torch.testing.assert_close(emb.signal.weight.grad, grad)


def test_skewed_layouts_use_the_flat_sum():
    # one entity with 200 tracks, 99 with one each: padding would be 100 x 200 slots
    entity = torch.cat([torch.zeros(200, dtype=torch.long), torch.arange(1, 100)])
    feature = torch.cat([torch.arange(200), torch.zeros(99, dtype=torch.long)])
    assert not build_slots(entity, feature, 100).padded
    assert build_slots(torch.arange(10) % 5, torch.arange(10) // 5, 5).padded


def test_select_targets_counts_and_support():
    gen = torch.Generator().manual_seed(0)
    observed = torch.ones(500, 10, dtype=torch.bool)
    observed[:, 7:] = torch.rand(500, 3, generator=gen) < 0.5
    observed[0] = False
    observed[1, 0] = True  # exactly one observed track -> no target
    observed[1, 1:] = False
    target, valid = select_targets(observed, 3, gen)
    assert target.shape == (500, 3)
    n_obs = observed.sum(1)
    assert torch.equal(valid.sum(1), torch.minimum(torch.tensor(3), (n_obs - 1).clamp(min=0)))
    chosen = torch.gather(observed, 1, target)
    assert chosen[valid].all()  # targets are observed tracks
    hidden = torch.zeros_like(observed).scatter_(1, target, valid)
    assert ((observed & ~hidden).sum(1)[n_obs > 0] >= 1).all()  # support never empty
    # random per bin: the full-observation bins do not all share one target set
    full = observed.all(1)
    sets = {tuple(sorted(r.tolist())) for r in target[full]}
    assert len(sets) > 0.6 * int(full.sum())
    # every track is drawn about equally often among fully observed bins
    counts = torch.bincount(target[full].flatten(), minlength=10).float()
    assert counts.min() > 0.6 * counts.mean()

    target, valid = select_targets(observed, 0.25, gen)
    assert target.shape == (500, 3)  # ceil(0.25 * 10)
    want = torch.round(n_obs.double() * 0.25).long().clamp(min=1)
    want = torch.minimum(want, (n_obs - 1).clamp(min=0))
    assert torch.equal(valid.sum(1), want)


def test_attention_ignores_unobserved_entities():
    nb, na = 5, 4
    net = EDiceNet(nb, na, **SMALL).eval()
    pairs = [(i, j) for i in range(nb) for j in range(na) if (i + j) % 3 != 0]
    bio = torch.tensor([p[0] for p in pairs])
    assay = torch.tensor([p[1] for p in pairs])
    sb, sa = build_slots(bio, assay, nb), build_slots(assay, bio, na, max_padding=0)
    b = 64
    values = torch.randn(b, len(pairs))
    support = torch.rand(b, len(pairs)) < 0.5
    support[:, bio == 4] = False  # biosample 4 unobserved everywhere
    tb = torch.randint(0, 4, (b, 3))
    ta = torch.randint(0, na, (b, 3))
    with torch.no_grad():
        base = net(values, support, sb, sa, tb, ta)
        # 1. values outside the support have no effect
        noisy = values + 100 * torch.randn_like(values) * (~support)
        torch.testing.assert_close(net(noisy, support, sb, sa, tb, ta), base, rtol=0, atol=0)
        # 2. the global embedding of an unobserved, untargeted entity has no effect
        net.biosample_embedder.global_embedding[4] += 10.0
        torch.testing.assert_close(net(values, support, sb, sa, tb, ta), base, rtol=0, atol=0)
        # 3. ... while a support value does
        moved = values.clone()
        moved[support] += 1.0
        assert not torch.allclose(net(moved, support, sb, sa, tb, ta), base)
        # 4. a bin with no support at all is finite (no NaN from an empty softmax)
        empty = torch.zeros_like(support)
        assert torch.isfinite(net(values, empty, sb, sa, tb, ta)).all()


def test_predict_hides_the_target_track_itself():
    nb, na, n = 3, 3, 50
    y = low_rank(nb, na, n)
    pairs = [(i, j) for i in range(nb) for j in range(na)]
    data = make_data(y, pairs)
    model = EDice.build(EDiceParams(**SMALL, n_targets=2), grid_vocab(nb, na), data)
    before = model.predict(data, 1, 2)
    data.values[pairs.index((1, 2))] += 5.0  # the track of (1, 2) itself
    torch.testing.assert_close(model.predict(data, 1, 2), before)
    assert not torch.allclose(model.predict(data, 0, 2), before)
    assert model.training  # predict restores the mode


def test_predict_many_matches_predict_for_untrained_tracks():
    nb, na, n = 4, 3, 70
    y = low_rank(nb, na, n)
    held = [(0, 1), (2, 2), (3, 0)]
    pairs = [(i, j) for i in range(nb) for j in range(na) if (i, j) not in held]
    data = make_data(y, pairs)
    model = EDice.build(
        EDiceParams(**SMALL, n_targets=2, predict_batch_size=32), grid_vocab(nb, na), data
    )
    many = model.predict_many(data, held)
    assert many.shape == (3, n)
    for k, (i, j) in enumerate(held):
        torch.testing.assert_close(many[k], model.predict(data, i, j))


# -- training ------------------------------------------------------------------------------


def test_batches_cover_every_bin_once_and_are_seeded():
    nb, na, n = 3, 3, 300
    y = low_rank(nb, na, n)
    data = make_data(y, [(i, j) for i in range(nb) for j in range(na)])
    model = EDice.build(EDiceParams(**SMALL, n_targets=0.3), grid_vocab(nb, na), data)
    seen = []
    assert model.targets_per_bin(data) == 3  # ceil(0.3 * 9)
    for batch in model.batches(data, torch.Generator().manual_seed(3), 64 * 3):
        t = batch.tensors
        assert t["target"].shape == (batch.size // 3, 3) == (t["values"].shape[0], 3)
        # every batch row is one bin: values are the column of data.values at some bin
        match = (t["values"].unsqueeze(2) == data.values.unsqueeze(0)).all(1)
        assert (match.sum(1) == 1).all()
        seen.append(match.float().argmax(1))
        hidden = ~t["support"]
        assert torch.equal(hidden.sum(1), t["valid"].sum(1))
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(n))
    a = next(model.batches(data, torch.Generator().manual_seed(3), 64 * 3)).tensors
    b = next(model.batches(data, torch.Generator().manual_seed(3), 64 * 3)).tensors
    assert a["values"].shape[0] == 64
    assert torch.equal(a["target"], b["target"]) and torch.equal(a["values"], b["values"])


def test_low_rank_tensor_beats_average_activity_on_held_out_tracks():
    nb, na, n = 6, 5, 2000
    y = low_rank(nb, na, n)
    held = [(0, 1), (1, 3), (2, 0), (3, 2), (4, 4), (5, 0)]
    pairs = [(i, j) for i in range(nb) for j in range(na) if (i, j) not in held]
    data = make_data(y, pairs)
    params = EDiceParams(dim=32, ffn_hidden=32, mlp_hidden=128, n_targets=0.2)
    model = EDice.build(params, grid_vocab(nb, na), data)
    losses = train(model, data, steps=100)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
    ours, baseline = [], []
    for i, j in held:
        pred = model.predict(data, i, j).numpy()
        avg = np.mean([y[k, j] for k in range(nb) if (k, j) in pairs], axis=0)
        ours.append(np.mean((pred - y[i, j]) ** 2))
        baseline.append(np.mean((avg - y[i, j]) ** 2))
    ours, baseline = np.array(ours), np.array(baseline)
    assert ours.mean() < 0.6 * baseline.mean(), (ours, baseline)
    assert (ours < baseline).sum() >= 4, (ours, baseline)


# -- transfer learning ---------------------------------------------------------------------


def _snapshot(model: EDice) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_freeze_keeps_global_embeddings_and_attention():
    nb, na = 4, 3
    y = low_rank(nb, na, 400)
    data = make_data(y, [(i, j) for i in range(nb) for j in range(na)])
    model = EDice.build(EDiceParams(**SMALL, n_targets=3), grid_vocab(nb, na), data)
    model.freeze({"global_embeddings", "attention"})
    before = _snapshot(model)
    train(model, data, steps=5)
    after = _snapshot(model)
    for name in before:
        same = torch.equal(before[name], after[name])
        frozen = "embedding" in name or "attention" in name
        if name.endswith("new_embedding"):
            continue  # empty
        assert same == frozen, name
    with pytest.raises(ConfigError, match="cannot freeze"):
        model.freeze({"genome_factors"})


def test_extend_with_a_new_biosample_trains_only_its_embedding():
    nb, na, n = 4, 3, 400
    y = low_rank(nb + 1, na, n)
    vocab = grid_vocab(nb, na)
    old_pairs = [(i, j) for i in range(nb) for j in range(na)]
    data = make_data(y, old_pairs)
    model = EDice.build(EDiceParams(**SMALL, n_targets=3), vocab, data)
    train(model, data, steps=3)
    before = _snapshot(model)
    ref = model.predict(data, 0, 0)

    new_vocab = vocab.extend([(f"b{nb}.a0", f"b{nb}", "a0", "human")])
    model.extend(new_vocab)
    assert model.vocab is new_vocab
    emb = model.net.biosample_embedder
    assert emb.n_entities == nb + 1 and emb.new_embedding.shape == (1, SMALL["dim"])
    assert model.net.assay_embedder.n_entities == na
    assert model.net.assay_embedder.signal.weight.shape == (SMALL["dim"], nb + 1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and p.numel()]
    assert trainable == ["net.biosample_embedder.new_embedding"]
    # nothing observed for the new biosample: old predictions unchanged
    torch.testing.assert_close(model.predict(data, 0, 0), ref)

    # fine-tune with the new biosample's track observed
    new_data = make_data(y, [*old_pairs, (nb, 0)])
    new_row = emb.new_embedding.detach().clone()
    train(model, new_data, steps=10)
    after = _snapshot(model)
    for name, value in before.items():
        if name.endswith("new_embedding"):
            continue  # empty before extend
        # the extended signal weight keeps its old columns; frozen new columns checked below
        old = after[name][tuple(slice(0, s) for s in value.shape)]
        assert torch.equal(old, value), name
    grown = model.net.assay_embedder.signal.weight
    torch.testing.assert_close(grown[:, nb], before["net.assay_embedder.signal.weight"].mean(1))
    assert not torch.equal(emb.new_embedding, new_row)
    assert model.predict(new_data, nb, 1).shape == (n,)

    # the saved state rebuilds with the same split of old and new rows, new rows trainable
    state = model.state_dict()
    again = EDice.from_state(model.params, new_vocab, new_data, state)
    assert again.net.biosample_embedder.new_embedding.shape == (1, SMALL["dim"])
    torch.testing.assert_close(again.predict(new_data, nb, 1), model.predict(new_data, nb, 1))
    assert [n for n, p in again.named_parameters() if p.requires_grad] == trainable
    # re-applying extend with nothing new (resume) keeps the new row and its trainability
    again.extend(new_vocab)
    assert again.net.biosample_embedder.new_embedding.shape == (1, SMALL["dim"])
    assert [n for n, p in again.named_parameters() if p.requires_grad] == trainable

    with pytest.raises(EpirayError, match="reorders or drops"):
        model.extend(grid_vocab(nb + 2, na, prefix="x"))


# -- errors --------------------------------------------------------------------------------


def test_bad_indices_are_reported():
    y = low_rank(2, 2, 20)
    data = make_data(y, [(0, 0), (1, 1)])
    with pytest.raises(InputDataError, match=r"chrom 'chr1'.*assay index out of range"):
        EDice.build(EDiceParams(**SMALL), grid_vocab(2, 1), data)
    model = EDice.build(EDiceParams(**SMALL), grid_vocab(2, 2), data)
    with pytest.raises(EpirayError, match=r"pairs \[\(2, 0\)\] invalid"):
        model.predict(data, 2, 0)


# -- cross-species -------------------------------------------------------------------------


def cross_species(n: int = 200):
    """Mouse 3 biosamples x 2 assays; human 2 biosamples x 3 assays (assay a2 human-only)."""
    recs = [(f"m{i}.a{j}", f"m{i}", f"a{j}", "mouse") for i in range(3) for j in range(2)]
    recs += [(f"h{i}.a{j}", f"h{i}", f"a{j}", "human") for i in range(2) for j in range(3)]
    vocab = Vocabulary.from_records(recs, chrom="chr1", n_bins=n)
    key = {e: k for e, k in vocab.experiments.items()}
    rng = np.random.default_rng(0)
    mouse = [key[f"m{i}.a{j}"] for i in range(3) for j in range(2)]
    human = [key[f"h{i}.a{j}"] for i in range(2) for j in range(3)]
    # alignment rows: bins 0..59 aligned once, 60..79 twice, 80.. unaligned; rows unsorted
    aux_bin = np.concatenate([np.arange(60), np.arange(60, 80), np.arange(60, 80)])
    perm = rng.permutation(len(aux_bin))
    aux_bin = aux_bin[perm]
    aux_values = rng.random((len(human), len(aux_bin)), dtype=np.float32) * 3
    kw = dict(chrom="chr1", device="cpu")
    plain = chrom_data_from_numpy(
        rng.random((len(mouse), n), dtype=np.float32) * 3,
        [k.biosample for k in mouse],
        [k.assay for k in mouse],
        **kw,
    )
    aux = chrom_data_from_numpy(
        plain.values.numpy(),
        plain.biosample.numpy(),
        plain.assay.numpy(),
        aux_values=aux_values,
        aux_bin=aux_bin,
        aux_biosample=[k.biosample for k in human],
        aux_assay=[k.assay for k in human],
        **kw,
    )
    return vocab, plain, aux


def test_cross_species_support_changes_only_aligned_bins():
    vocab, plain, aux = cross_species()
    model = EDice.build(EDiceParams(**SMALL, n_targets=2), vocab, aux).eval()
    m0, a2 = vocab.biosample_index("m0"), vocab.assay_index("a2")
    for b, a in [(m0, a2), (m0, vocab.assay_index("a1"))]:
        with_aux = model.predict(aux, b, a)
        without = model.predict(plain, b, a)
        torch.testing.assert_close(with_aux[80:], without[80:], rtol=0, atol=1e-5)
        assert ((with_aux[:80] - without[:80]).abs() > 1e-4).all()


def test_cross_species_alignment_mean_and_first():
    vocab, _, aux = cross_species()
    bins = torch.tensor([5, 65, 90])
    rows = {b: np.flatnonzero(aux.aux_bin.numpy() == b) for b in bins.tolist()}
    for reduce in ("mean", "first"):
        model = EDice.build(EDiceParams(**SMALL, aux_reduce=reduce), vocab, aux)
        values, observed = model._gather(aux, model._tracks(aux), bins)
        e = aux.n_experiments
        assert values.shape == (3, e + 6)
        assert observed[:, :e].all()
        assert observed[:2, e:].all() and not observed[2, e:].any()
        assert (values[2, e:] == 0).all()
        for k, b in enumerate(bins.tolist()[:2]):
            r = rows[b] if reduce == "mean" else rows[b][:1]
            want = aux.aux_values[:, r].mean(1)
            torch.testing.assert_close(values[k, e:], want)


def test_cross_species_trains_a_human_only_assay():
    vocab, _, aux = cross_species()
    model = EDice.build(EDiceParams(**SMALL, n_targets=3), vocab, aux)
    gen = torch.Generator().manual_seed(0)
    a2 = vocab.assay_index("a2")
    drawn = set()
    for batch in model.batches(aux, gen, 192):
        t = batch.tensors
        drawn |= set(t["target_assay"][t["valid"]].tolist())
    assert a2 in drawn  # human tracks at aligned bins are targets too
    model = EDice.build(EDiceParams(**SMALL, n_targets=3, aux_targets=False), vocab, aux)
    for batch in model.batches(aux, gen, 192):
        t = batch.tensors
        assert (t["target"][t["valid"]] < aux.n_experiments).all()
    losses = train(model, aux, steps=6)
    assert np.isfinite(losses).all()


# -- the shared training loop --------------------------------------------------------------


def test_trains_through_the_loop_and_checkpoints(tmp_path):
    from epiray.loop import LoopParams, fit, load_checkpoint, save_checkpoint

    nb, na, n = 4, 4, 600
    y = low_rank(nb, na, n)
    held = [(0, 1), (2, 3)]
    pairs = [(i, j) for i in range(nb) for j in range(na) if (i, j) not in held]
    data = make_data(
        y,
        pairs,
        val_values=np.stack([y[i, j] for i, j in held]),
        val_biosample=[i for i, _ in held],
        val_assay=[j for _, j in held],
    )
    model = get_model("edice").build(EDiceParams(**SMALL, n_targets=3), grid_vocab(nb, na), data)
    loop = LoopParams(epochs=3, batch_size=64 * 3, lr=3e-3, patience=None)
    state = fit(model, data, loop)
    hist = state.history
    assert len(hist) == 3 and all(h["val_mse"] is not None for h in hist)
    assert hist[0]["examples"] == n * 3  # every bin once per epoch, 3 targets each
    assert hist[-1]["train_mse"] < hist[0]["train_mse"]
    path = save_checkpoint(tmp_path / "rank0.pt", model, state)
    again, _ = load_checkpoint(path, data)
    assert isinstance(again, EDice)
    torch.testing.assert_close(again.predict(data, 0, 1), model.predict(data, 0, 1))


# -- validation cells and the CPU dropout -----------------------------------------------------


def test_validation_cells_are_neither_support_nor_targets():
    y = low_rank(4, 3, 400)
    pairs = [(i, j) for i in range(4) for j in range(3)]
    data = make_data(y, pairs, heldout=np.zeros((len(pairs), 4), bool), heldout_block=100)
    data.heldout[2, 1] = True  # track 2, bins 100-199
    data.heldout[5, 3] = True  # track 5, bins 300-399
    data.values[2, 100:200] = 1e4  # a sentinel no input or target may carry
    data.values[5, 300:400] = 1e4
    model = EDice.build(EDiceParams(**SMALL, n_targets=4), grid_vocab(4, 3), data)
    gen = torch.Generator().manual_seed(0)
    n_batches = 0
    for batch in model.batches(data, gen, 64 * 4):
        t = batch.tensors
        sentinel = t["values"] == 1e4
        assert not (sentinel & t["support"]).any()
        targets = torch.gather(t["values"], 1, t["target"])
        assert not ((targets == 1e4) & t["valid"]).any()
        n_batches += 1
    assert n_batches == 7
    vals, observed = model._gather(data, model._tracks(data), torch.tensor([150, 350, 50]))
    assert not observed[0, 2] and not observed[1, 5] and observed[2].all()
    # predict_cells: one cell per bin predicts exactly what predict() does at that bin
    data.values[2, 100:200] = torch.from_numpy(y[pairs[2]][100:200])
    data.values[5, 300:400] = torch.from_numpy(y[pairs[5]][300:400])
    data.heldout = None
    track, bins = torch.tensor([0, 7, 11]), torch.tensor([10, 20, 30])
    got = model.predict_cells(data, track, bins)
    for t, b, g in zip(track.tolist(), bins.tolist(), got.tolist()):
        full = model.predict(data, int(data.biosample[t]), int(data.assay[t]))
        assert g == pytest.approx(float(full[b]), abs=1e-5)


def test_cpu_dropout_keeps_the_expectation():
    from epiray.models.edice import Dropout

    x = torch.ones(200_000)
    d = Dropout(0.3)
    d.train()
    out = d(x)
    kept = out > 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01  # 77/256 of the bytes are dropped
    assert out.mean().item() == pytest.approx(1.0, abs=0.01)
    assert torch.equal(out[kept], torch.full_like(out[kept], 256 / 179))
    d.eval()
    assert torch.equal(d(x), x)
