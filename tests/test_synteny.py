"""Synteny on the synthetic compendium: alignment tables, summary, materialised human tracks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from epiray import synthetic
from epiray.chain import bin_blocks, read_chain
from epiray.errors import InputDataError, StoreError
from epiray.store import Store, read_part_meta
from epiray.synteny import index_path, materialise, read_index, synteny_dir, write_alignment

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NAME = "hsSyn1ToMmSyn1"


def rows_of(store: Store, chrom: str, name: str = NAME) -> list[tuple[int, str, int]]:
    df = store.read_alignment(name, chrom)
    return list(zip(df["mouse_bin"].tolist(), df["human_chrom"].astype(str), df["human_bin"]))


def reference_rows(layout, bin_size: int = 25) -> dict[tuple[str, int], list]:
    """The documented rule applied to the generator's own blocks (not the chain file):
    (mouse chrom, strand) -> [(mouse_bin, human_chrom, human_bin)]."""
    b = layout.blocks()
    out: dict[tuple[str, int], list] = {}
    for hc, h0, mc, m0, size, strand in zip(
        b["human_chrom"],
        b["human_start"],
        b["mouse_chrom"],
        b["mouse_start"],
        b["size"],
        b["strand"],
    ):
        if size < bin_size:
            continue
        hb = range(h0 // bin_size, (h0 + size) // bin_size)
        mb = range(m0 // bin_size, (m0 + size) // bin_size)
        if strand > 0:
            pairs = [(m, str(hc), h) for m, h in zip(mb, hb)]
        else:  # the mouse bin holding the partner of each human bin's centre base
            c = h0 + m0 + size - 1
            pairs = [((c - x * bin_size - 12) // bin_size, str(hc), x) for x in hb]
            pairs = [p for p in pairs if p[0] in mb]
        out.setdefault((str(mc), int(strand)), []).extend(pairs)
    return out


@pytest.fixture(scope="module")
def compendium(tmp_path_factory, ray_local):
    """The tiny synthetic compendium (inversions, duplications) ingested as float16."""
    from epiray.ingest import AssemblySpec, IngestConfig, ingest

    out = tmp_path_factory.mktemp("synth")
    res = synthetic.generate(out / "c", seed=0, params=synthetic.SynthParams.tiny())
    # 8 human experiments and 2 mouse ones (the mouse assembly must be in the store) keep the
    # ingest short
    m = pd.read_csv(res.manifest, sep="\t")
    m = pd.concat([m[m.species == "human"].head(8), m[m.species == "mouse"].head(2)])
    m.to_csv(out / "c" / "manifest_small.tsv", sep="\t", index=False)
    cfg = IngestConfig(
        manifest=str(out / "c" / "manifest_small.tsv"),
        store=str(out / "store"),
        chroms="all",
        dtype="float16",
        assemblies={
            a: AssemblySpec(chrom_sizes=str(out / "c" / "genomes" / f"{a}.chrom.sizes"))
            for a in res.chrom_sizes
        },
    )
    store = ingest(cfg)
    info = write_alignment(store, res.chain, human_assembly="hsSyn1", mouse_assembly="mmSyn1")
    write_alignment(
        store,
        res.chain,
        human_assembly="hsSyn1",
        mouse_assembly="mmSyn1",
        name="mirrored",
        minus_strand="mirrored",
    )
    return res, store, info


def test_alignment_equals_truth_exactly(tmp_path):
    """The paper's rule (the default) recovers the generator's truth_alignment.npz exactly,
    including '-' strand blocks and mouse bins aligned twice (human-only duplications)."""
    res = synthetic.generate(tmp_path / "c", seed=1, params=synthetic.SynthParams.tiny())
    chains = read_chain(res.chain, res.chrom_sizes["hsSyn1"], res.chrom_sizes["mmSyn1"])
    assert (chains.q_strand < 0).any() and (chains.q_strand > 0).any()
    al = bin_blocks(chains, "target_human")
    truth = np.load(res.truth_alignment)
    twice = 0
    for chrom in truth["chroms"]:
        c = str(chrom)
        want = list(
            zip(
                truth[f"{c}.mouse_bin"].tolist(),
                truth[f"{c}.human_chrom"].tolist(),
                truth[f"{c}.human_bin"].tolist(),
            )
        )
        got = list(zip(al[c].mouse_bin.tolist(), al[c].human_chrom_names, al[c].human_bin))
        assert sorted(got) == sorted(want)
        assert np.all(np.diff(al[c].mouse_bin) >= 0)
        twice += int((np.bincount(al[c].mouse_bin) > 1).sum())
    assert twice > 0


@pytest.mark.ray
def test_store_alignment_recovers_generator_blocks(compendium):
    res, store, info = compendium
    ref = reference_rows(res.layout)
    assert any(s < 0 for _, s in ref)  # the compendium has '-' strand blocks
    truth = np.load(res.truth_alignment)
    for chrom in res.chrom_sizes["mmSyn1"]:
        # the store's table (paper rule) is exactly the generator's truth table
        want = Counter(
            zip(
                truth[f"{chrom}.mouse_bin"].tolist(),
                truth[f"{chrom}.human_chrom"].tolist(),
                truth[f"{chrom}.human_bin"].tolist(),
            )
        )
        assert Counter(rows_of(store, chrom)) == want
        mouse_bin = store.read_alignment(NAME, chrom)["mouse_bin"].to_numpy()
        assert mouse_bin.dtype == np.int64 and np.all(np.diff(mouse_bin) >= 0)
        # the mirrored table follows the documented rule on the generator's own blocks
        plus, minus = ref.get((chrom, 1), []), ref.get((chrom, -1), [])
        assert Counter(rows_of(store, chrom, "mirrored")) == Counter(plus + minus)
    # mirrored: aligned bases (the generator's own base-level liftover) fall in paired bins
    pairs = {(c, *r) for c in res.chrom_sizes["mmSyn1"] for r in rows_of(store, c, "mirrored")}
    for hc, size in res.chrom_sizes["hsSyn1"].items():
        pos = np.arange(size)
        mc, mp, strand = res.layout.lift(hc, pos)
        for s in "+-":
            sel = (mp >= 0) & (strand == s)
            keys = zip(mc[sel].tolist(), (mp[sel] // 25).tolist(), (pos[sel] // 25).tolist())
            frac = np.mean([(m, b, hc, h) in pairs for m, b, h in keys])
            assert frac > 0.5, (hc, s, frac)


@pytest.mark.ray
def test_summary_and_index(compendium):
    res, store, info = compendium
    s = Store.open(store.root).summary["synteny"][NAME]
    assert s["orientation"] == "target_human" and s["key"] == info["key"]
    assert s["mouse_chroms"] == list(res.chrom_sizes["mmSyn1"])
    total_rows = total_aligned = total_multi = 0
    per_human: Counter = Counter()
    for chrom in s["mouse_chroms"]:
        df = store.read_alignment(NAME, chrom)
        st = s["chroms"][chrom]
        counts = np.bincount(df["mouse_bin"], minlength=st["n_bins"])
        assert st["n_alignments"] == len(df)
        assert st["n_bins"] == store.n_bins("mmSyn1", chrom)
        assert st["aligned_bins"] == int((counts > 0).sum())
        assert st["multi_aligned_bins"] == int((counts > 1).sum())
        assert st["fraction_aligned"] == pytest.approx(st["aligned_bins"] / st["n_bins"])
        assert st["rows_per_human_chrom"] == dict(Counter(df["human_chrom"].astype(str)))
        total_rows += len(df)
        total_aligned += st["aligned_bins"]
        total_multi += st["multi_aligned_bins"]
        per_human.update(st["rows_per_human_chrom"])
    assert (s["n_alignments"], s["aligned_bins"]) == (total_rows, total_aligned)
    assert s["multi_aligned_bins"] == total_multi > 0
    assert s["rows_per_human_chrom"] == dict(per_human)
    assert 0 < s["fraction_aligned"] < 1
    assert s["dropped"] == {"human_chrom_not_in_store": 0, "mouse_chrom_not_in_store": 0}
    # the index lists every row once, grouped by mouse chromosome
    for h in s["human_chroms"]:
        idx = read_index(store, NAME, h)
        start = 0
        for chrom in s["mouse_chroms"]:
            n = s["chroms"][chrom]["rows_per_human_chrom"].get(h, 0)
            df = store.read_alignment(NAME, chrom)
            rows = idx[start : start + n, 0]
            assert (df["human_chrom"].astype(str).to_numpy()[rows] == h).all()
            np.testing.assert_array_equal(df["human_bin"].to_numpy()[rows], idx[start:][:n, 1])
            start += n
        assert start == len(idx)


@pytest.mark.ray
def test_materialised_values_equal_direct_reads_and_resume(compendium):
    res, store, info = compendium
    stats = materialise(store, NAME)
    exps = store.experiments(assembly="hsSyn1")["experiment"].tolist()
    n_mouse = len(res.chrom_sizes["mmSyn1"])
    assert stats["parts_written"] == len(exps) * n_mouse and stats["parts_skipped"] == 0
    assert stats["values"] == len(exps) * info["n_alignments"]
    store = Store.open(store.root)
    for chrom in res.chrom_sizes["mmSyn1"]:
        df = store.read_alignment(NAME, chrom)
        got = store.read_aligned(NAME, chrom, exps, dtype="float16")
        assert got.shape == (len(exps), len(df))
        want = np.empty_like(got)
        for h in df["human_chrom"].astype(str).unique():
            sel = (df["human_chrom"].astype(str) == h).to_numpy()
            dense = store.read("hsSyn1", h, exps, dtype="float16")
            want[:, sel] = dense[:, df["human_bin"].to_numpy()[sel]]
        np.testing.assert_array_equal(got, want)  # bit-exact copies
        mid = len(df) // 3
        np.testing.assert_array_equal(
            store.read_aligned(NAME, chrom, exps[:2], mid, 2 * mid), want[:2, mid : 2 * mid]
        )
        meta = read_part_meta(store.synteny_part_path(NAME, chrom, exps[0]))
        assert meta["alignment_key"] == info["key"] and meta["stats"]["n"] == len(df)
    s = store.summary["synteny"][NAME]
    assert sorted(s["experiments"]) == sorted(exps)
    staging = synteny_dir(store, NAME) / "staging"
    assert not any(staging.glob("experiment=*"))  # removed once an experiment is complete
    # resume: nothing to do; a lost part is the only one rewritten
    again = materialise(store, NAME)
    assert again["parts_written"] == 0 and again["parts_skipped"] == len(exps) * n_mouse
    lost = store.synteny_part_path(NAME, "chr1", exps[3])
    kept = store.synteny_part_path(NAME, "chr1", exps[4])
    before = kept.stat().st_mtime_ns
    lost.unlink()
    third = materialise(store, NAME, exps[3:5])
    assert third["parts_written"] == 1 and third["gather_tasks"] >= 1
    assert lost.is_file() and kept.stat().st_mtime_ns == before
    with pytest.raises(StoreError, match="not stored experiments of the human assembly"):
        materialise(store, NAME, ["no_such_experiment"])


@pytest.mark.ray
def test_existing_synteny_needs_resume_or_overwrite(compendium):
    res, store, info = compendium
    with pytest.raises(StoreError, match=f"synteny '{NAME}' already exists"):
        write_alignment(store, res.chain, human_assembly="hsSyn1", mouse_assembly="mmSyn1")
    kept = write_alignment(
        store, res.chain, human_assembly="hsSyn1", mouse_assembly="mmSyn1", resume=True
    )
    assert kept["key"] == info["key"]
    assert index_path(store, NAME, "chr1").is_file()


@pytest.mark.ray
def test_foreign_or_misoriented_chain_refused(compendium, tmp_path):
    res, store, info = compendium
    with pytest.raises(InputDataError, match=r"other way round \(target hsSyn1, query mmSyn1\)"):
        write_alignment(
            store,
            res.chain,
            human_assembly="hsSyn1",
            mouse_assembly="mmSyn1",
            orientation="target_mouse",
            name="flipped",
        )
    with pytest.raises(StoreError, match="assembly 'hg38' not in the store"):
        write_alignment(store, res.chain, human_assembly="hg38", mouse_assembly="mmSyn1")
    if DATA.is_dir():
        chrm = DATA / "chains" / "hg38.mm10.chrM.chain"
        with pytest.raises(InputDataError, match=r"hg38\.mm10\.chrM\.chain.*no target chromosome"):
            write_alignment(store, chrm, human_assembly="hsSyn1", mouse_assembly="mmSyn1")
        hg = DATA / "chains" / "hg38ToHg19.over.chain.gz"
        with pytest.raises(InputDataError, match=r"target chromosome 'chr1' has length 248956422"):
            write_alignment(store, hg, human_assembly="hsSyn1", mouse_assembly="mmSyn1")
    assert set(Store.open(store.root).summary["synteny"]) == {NAME, "mirrored"}


@pytest.mark.ray
def test_slab_size_from_the_store_equals_the_loaded_slab(compendium):
    """A worker sizes its slab (alignment rows, human positions) before loading it; the memory
    estimate then covers every variant's tensors."""
    import torch

    from epiray.loader import Aux, load_chrom_data, shard_bounds, slab_size
    from epiray.models import SlabSize, Vocabulary
    from epiray.models.avocado import Avocado, AvocadoParams

    res, store, _ = compendium
    materialise(store, NAME)
    store = Store.open(store.root)
    table = store.experiments()
    mouse = table[table.species == "mouse"]["experiment"].tolist()
    human = table[table.species == "human"]["experiment"].tolist()
    n_bins = store.n_bins("mmSyn1", "chr1")
    vocab = Vocabulary.from_records(table, chrom="chr1", n_bins=n_bins)
    aux = Aux(NAME, human)
    for rank in range(2):
        lo, hi = shard_bounds(n_bins, 2, rank)
        kw = dict(validate=mouse[1:], aux=aux, value_dtype=torch.float16)
        size = slab_size(store, "mmSyn1", "chr1", lo, hi, mouse[:1], **kw)
        data = load_chrom_data(store, "mmSyn1", "chr1", lo, hi, vocab, mouse[:1], **kw)
        assert size == SlabSize.of(data) and size.aux_rows > 0
        tensors = [v for v in vars(data).values() if isinstance(v, torch.Tensor)]
        assert size.data_bytes() == sum(t.numel() * t.element_size() for t in tensors)
        for variant in ("cross_species", "concat"):
            params = AvocadoParams(variant=variant, n_nodes=16, n_assay_factors=8)
            est = Avocado.memory_estimate(params, vocab, size, 512)
            model = Avocado.build(params, vocab, data)
            genome = sum(p.numel() * 4 for p in model.sparse_parameters())
            # cross_species: mouse bins only; concat: also every distinct human position
            assert est["genome"] == genome, variant
