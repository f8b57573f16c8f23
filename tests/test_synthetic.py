"""The synthetic human + mouse compendium: files, exact truth, the chain file and its alignment.

The chain file is checked three independent ways: a parser written here, the ``pyliftover``
package, and the generator's own merged-coordinate mapping (``SynthLayout.lift``).
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pyBigWig
import pytest
from pyliftover import LiftOver

from epiray import synthetic as S
from epiray.errors import ConfigError, InputDataError
from epiray.manifest import CATEGORIES, read_manifest

BIN = 25


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> S.SynthResult:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    return S.generate(out, seed=0, params=S.SynthParams.tiny())


def read_chain(path: Path) -> list[dict]:
    """Parse a UCSC chain file: header fields and per-block (t, q, size) in chain coordinates."""
    chains = []
    with gzip.open(path, "rt") as f:
        lines = f.read().split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip():
            continue
        fields = line.split(" ")
        assert fields[0] == "chain" and len(fields) == 13, line
        c = dict(
            score=int(fields[1]),
            tName=fields[2],
            tSize=int(fields[3]),
            tStrand=fields[4],
            tStart=int(fields[5]),
            tEnd=int(fields[6]),
            qName=fields[7],
            qSize=int(fields[8]),
            qStrand=fields[9],
            qStart=int(fields[10]),
            qEnd=int(fields[11]),
            id=int(fields[12]),
        )
        sizes, dts, dqs = [], [], []
        while True:
            parts = lines[i].split("\t")
            i += 1
            sizes.append(int(parts[0]))
            if len(parts) == 1:
                break
            assert len(parts) == 3, parts
            dts.append(int(parts[1]))
            dqs.append(int(parts[2]))
        assert lines[i] == "", "a blank line must separate chains"
        size, dt, dq = np.array(sizes), np.array(dts, dtype=int), np.array(dqs, dtype=int)
        t = c["tStart"] + np.concatenate([[0], np.cumsum(size[:-1] + dt)])
        q = c["qStart"] + np.concatenate([[0], np.cumsum(size[:-1] + dq)])
        c.update(size=size, dt=dt, dq=dq, t=t, q=q)
        chains.append(c)
    return chains


def chain_blocks_forward(chains: list[dict]) -> list[tuple]:
    """(human chrom, human start, mouse chrom, mouse forward start, size) for every block."""
    out = []
    for c in chains:
        q = c["q"] if c["qStrand"] == "+" else c["qSize"] - (c["q"] + c["size"])
        out += list(zip([c["tName"]] * len(q), c["t"], [c["qName"]] * len(q), q, c["size"]))
    return out


def bin_bigwig(path: Path, chrom: str) -> np.ndarray:
    """Per-25 bp-bin mean of a bigWig chromosome (bases without data = 0), via pyBigWig."""
    bw = pyBigWig.open(str(path))
    try:
        size = bw.chroms()[chrom]
        v = np.nan_to_num(bw.values(chrom, 0, size, numpy=True), nan=0.0).astype(np.float64)
    finally:
        bw.close()
    edges = np.arange(0, size, BIN)
    return np.add.reduceat(v, edges) / np.diff(np.append(edges, size))


# ------------------------------------------------------------------------------------ files
def test_files_and_manifest(tiny):
    out = tiny.out
    for rel in [
        "genomes/hsSyn1.chrom.sizes",
        "genomes/mmSyn1.chrom.sizes",
        S.CHAIN_PATH,
        "manifest.tsv",
        "truth/truth.json",
        "truth_alignment.npz",
        "synth.json",
    ]:
        assert (out / rel).is_file(), rel
    header = (out / "manifest.tsv").read_text().splitlines()[0].split("\t")
    assert header == list(S.MANIFEST_COLUMNS)
    df = read_manifest(out / "manifest.tsv")  # validates categories, paths, species/assembly
    assert set(df["category"]) <= set(CATEGORIES)
    assert df.groupby("species").size().to_dict() == {"human": 40, "mouse": 30}
    for r in df.itertuples():
        prefix = S.PREFIXES[r.species]
        assert r.assembly == S.ASSEMBLIES[r.species]
        assert re.fullmatch(rf"{prefix}\.B\d+", r.biosample)
        assert r.experiment == f"{r.biosample}.{r.assay}"
        assert Path(r.path).is_file() and Path(r.path).suffix == ".bw"
        assert r.category == S.ASSAY_CATALOGUE[r.assay].category
    assert not df["experiment"].duplicated().any()
    for sp in S.SPECIES:
        sizes = dict(
            line.split("\t")
            for line in (out / "genomes" / f"{S.ASSEMBLIES[sp]}.chrom.sizes")
            .read_text()
            .split("\n")
            if line
        )
        assert list(sizes) == [f"chr{i + 1}" for i in range(len(sizes))]
        assert all(int(n) % BIN != 0 for n in sizes.values())
        assert {c: int(n) for c, n in sizes.items()} == tiny.chrom_sizes[S.ASSEMBLIES[sp]]
    assert "hsSyn1" in tiny.describe()


def test_zero_shot_assays_and_design(tiny):
    df = read_manifest(tiny.out / "manifest.tsv", check_files=False)
    params = S.SynthParams.tiny()
    mouse = df[df["species"] == "mouse"]
    human = df[df["species"] == "human"]
    for assay in params.human_only_assays:
        assert assay not in set(mouse["assay"])
        assert (human["assay"] == assay).sum() >= params.min_human_per_assay
        assert S.ASSAY_CATALOGUE[assay].category == "protein_binding"
    per_assay = mouse.groupby("assay").size()
    for assay in params.mouse_assays():
        want = (
            params.rare_mouse_experiments
            if assay in params.mouse_rare_assays
            else params.min_mouse_per_assay
        )
        assert per_assay.get(assay, 0) >= want
    pb = [a for a in params.mouse_assays() if S.ASSAY_CATALOGUE[a].category == "protein_binding"]
    assert len(pb) >= 6  # three zero-shot partitions of two assays
    # every biosample of both species has observed experiments, and truth.json agrees
    index = S.read_truth_index(tiny.out)
    for sp in S.SPECIES:
        entry = index["species"][sp]
        obs = np.array(entry["observed"])
        assert obs.shape == (len(entry["biosamples"]), len(entry["assays"]))
        assert obs.any(axis=1).all()
        assert obs.sum() == (df["species"] == sp).sum()
        assert set(entry["experiments"]) == set(df.loc[df["species"] == sp, "experiment"])
        assert entry["assays"] == list(params.all_assays())


# ------------------------------------------------------------------------------ exact truth
def test_bigwigs_read_back_as_truth(tiny):
    df = read_manifest(tiny.out / "manifest.tsv")
    index = S.read_truth_index(tiny.out)
    rng = np.random.default_rng(0)
    picks = [rng.choice(np.flatnonzero(df["species"] == sp), 6, replace=False) for sp in S.SPECIES]
    for i in np.concatenate(picks):
        row = df.iloc[i]
        bw = pyBigWig.open(row["path"])
        assert bw.chroms() == tiny.chrom_sizes[row["assembly"]]
        bw.close()
        for chrom in index["species"][row["species"]]["chroms"]:
            binned = bin_bigwig(Path(row["path"]), chrom)
            truth = S.read_truth(tiny.out, row["species"], chrom, row["biosample"], row["assay"])
            assert truth.dtype == np.float16
            assert len(binned) == -(-tiny.chrom_sizes[row["assembly"]][chrom] // BIN)
            assert (binned >= 0).all()
            np.testing.assert_allclose(
                np.arcsinh(binned.astype(np.float32)),
                truth.astype(np.float32),
                rtol=2e-6,
                atol=1e-6,
            )
    # raw-scale range: mostly background below 3, peaks in the tens
    t = S.read_truth(tiny.out, "human", "chr1").astype(np.float32)
    raw = np.sinh(t)
    assert np.median(raw) < 1.0 and np.percentile(raw, 90) < 6.0
    assert 15 < raw.max() < 200


def test_truth_has_shared_structure(tiny):
    """Aligned human and mouse bins share signal; unaligned pairings do not."""
    index = S.read_truth_index(tiny.out)
    assays = index["species"]["human"]["assays"]
    h = {
        c: S.read_truth(tiny.out, "human", c).astype(np.float32)
        for c in index["species"]["human"]["chroms"]
    }
    rng = np.random.default_rng(1)
    for assay in ["H3K36me3", "DNase", "GATA1"]:  # GATA1: never run in mouse, truth exists
        a = assays.index(assay)
        xs, ys = [], []
        for chrom in index["species"]["mouse"]["chroms"]:
            al = S.read_truth_alignment(tiny.out, chrom)
            m = S.read_truth(tiny.out, "mouse", chrom).astype(np.float32)
            for hc in np.unique(al["human_chrom"]):
                sel = al["human_chrom"] == hc
                xs.append(m[:, a, al["mouse_bin"][sel]].mean(axis=0))
                ys.append(h[hc][:, a, al["human_bin"][sel]].mean(axis=0))
        x, y = np.concatenate(xs), np.concatenate(ys)
        assert np.corrcoef(x, y)[0, 1] > 0.3, assay
        assert abs(np.corrcoef(x, rng.permutation(y))[0, 1]) < 0.1, assay


def test_read_truth_errors(tiny):
    with pytest.raises(InputDataError, match="chromosome 'chr9' not in mmSyn1"):
        S.read_truth(tiny.out, "mouse", "chr9")
    with pytest.raises(InputDataError, match="assay 'H3K4me2' not in mouse"):
        S.read_truth(tiny.out, "mouse", "chr1", "mm.B1", "H3K4me2")
    with pytest.raises(InputDataError, match="chromosome 'chr9' not found"):
        S.read_truth_alignment(tiny.out, "chr9")
    with pytest.raises(InputDataError, match="truth.json: file not found"):
        S.read_truth_index(tiny.out / "nowhere")


# ------------------------------------------------------------------------------ the chain
def test_chain_well_formed(tiny):
    chains = read_chain(tiny.chain)
    hs, ms = tiny.chrom_sizes["hsSyn1"], tiny.chrom_sizes["mmSyn1"]
    assert [c["id"] for c in chains] == list(range(1, len(chains) + 1))
    for c in chains:
        assert c["tStrand"] == "+" and c["qStrand"] in "+-"
        assert c["tSize"] == hs[c["tName"]] and c["qSize"] == ms[c["qName"]]
        assert c["size"].sum() + c["dt"].sum() == c["tEnd"] - c["tStart"]
        assert c["size"].sum() + c["dq"].sum() == c["qEnd"] - c["qStart"]
        assert 0 <= c["tStart"] < c["tEnd"] <= c["tSize"]
        assert 0 <= c["qStart"] < c["qEnd"] <= c["qSize"]
        assert (c["size"] > 0).all() and (c["dt"] >= 0).all() and (c["dq"] >= 0).all()
        assert ((c["dt"] > 0) | (c["dq"] > 0)).all()  # adjacent blocks would be one block
    strands = {c["qStrand"] for c in chains}
    assert strands == {"+", "-"}
    dt = np.concatenate([c["dt"] for c in chains])
    dq = np.concatenate([c["dq"] for c in chains])
    assert ((dt > 0) & (dq > 0)).any() and ((dt > 0) & (dq == 0)).any()
    assert ((dt == 0) & (dq > 0)).any()
    sizes = np.concatenate([c["size"] for c in chains])
    assert (sizes < BIN).any() and (sizes >= BIN).any()

    blocks = chain_blocks_forward(chains)
    chain_of = np.concatenate([[c["id"]] * len(c["size"]) for c in chains])

    def overlaps(keys, starts, ends):
        order = np.lexsort((starts, keys))
        k, s, e = keys[order], starts[order], ends[order]
        hit = (k[1:] == k[:-1]) & (s[1:] < e[:-1])
        return order[:-1][hit], order[1:][hit]

    hk = np.array([b[0] for b in blocks])
    hst = np.array([b[1] for b in blocks])
    mk = np.array([b[2] for b in blocks])
    mst = np.array([b[3] for b in blocks])
    size = np.array([b[4] for b in blocks])
    assert len(overlaps(hk, hst, hst + size)[0]) == 0  # unique coverage of human
    a, b = overlaps(mk, mst, mst + size)
    assert len(a) > 0 and (chain_of[a] != chain_of[b]).any()  # mouse covered twice
    # species-specific sequence: both genomes have bases outside every block
    for key, starts, chrom_sizes in ((hk, hst, hs), (mk, mst, ms)):
        for chrom, length in chrom_sizes.items():
            cov = np.zeros(length + 1, dtype=np.int64)
            np.add.at(cov, starts[key == chrom], 1)
            np.add.at(cov, starts[key == chrom] + size[key == chrom], -1)
            aligned = np.cumsum(cov[:-1]) > 0
            assert 0.1 < aligned.mean() < 0.9, chrom
            # a run of >= 1 kb unaligned bases: an insertion, not just a chain gap
            edges = np.flatnonzero(np.diff(np.concatenate([[1], aligned, [1]]).astype(int)))
            assert np.diff(edges)[::2].max() >= 1000, chrom
    # the generator's own block table is what the file says
    own = tiny.layout.blocks()
    mine = sorted(
        zip(
            own["human_chrom"],
            own["human_start"],
            own["mouse_chrom"],
            own["mouse_start"],
            own["size"],
        )
    )
    assert [tuple(map(str, x)) for x in mine] == [tuple(map(str, x)) for x in sorted(blocks)]


def test_chain_agrees_with_pyliftover(tiny):
    lo = LiftOver(str(tiny.chain))  # pyliftover opens .gz by extension
    rng = np.random.default_rng(3)
    own = tiny.layout.blocks()
    n_checked = {"+": 0, "-": 0, "unaligned": 0}
    for chrom, size in tiny.chrom_sizes["hsSyn1"].items():
        here = own["human_chrom"] == chrom
        edges = np.concatenate(
            [
                own["human_start"][here],
                own["human_start"][here] + own["size"][here] - 1,
                own["human_start"][here] - 1,
            ]
        )
        pos = np.unique(np.concatenate([rng.integers(0, size, 1500), edges]))
        pos = pos[(pos >= 0) & (pos < size)]
        mchrom, mpos, strand = tiny.layout.lift(chrom, pos)
        for p, mc, mp, st in zip(pos, mchrom, mpos, strand):
            got = lo.convert_coordinate(chrom, int(p))
            if mp < 0:
                assert got == [], (chrom, p, got)
                n_checked["unaligned"] += 1
            else:
                assert len(got) == 1, (chrom, p, got)
                assert got[0][:3] == (mc, mp, st), (chrom, p, got, (mc, mp, st))
                n_checked[st] += 1
    assert min(n_checked.values()) > 20, n_checked


def test_truth_alignment_matches_chain(tiny):
    """METHODS §2 recomputed here from the parsed chain file equals truth_alignment.npz."""
    blocks = chain_blocks_forward(read_chain(tiny.chain))
    expect: dict[str, list[tuple]] = {}
    for hc, hs, mc, ms, size in blocks:
        if size < BIN:
            continue
        h0, h1 = hs // BIN, (hs + size) // BIN
        m0, m1 = ms // BIN, (ms + size) // BIN
        n = min(h1 - h0, m1 - m0)
        expect.setdefault(mc, []).extend((m0 + k, hc, h0 + k) for k in range(n))
    z = np.load(tiny.truth_alignment)
    assert list(z["chroms"]) == list(tiny.chrom_sizes["mmSyn1"])
    repeated = 0
    for chrom in z["chroms"]:
        got = S.read_truth_alignment(tiny.out, chrom)
        rows = list(
            zip(got["mouse_bin"].tolist(), got["human_chrom"].tolist(), got["human_bin"].tolist())
        )
        assert rows == sorted(expect[chrom])
        assert got["mouse_bin"].dtype == np.int64 and got["human_bin"].dtype == np.int64
        assert (np.diff(got["mouse_bin"]) >= 0).all()
        assert got["mouse_bin"].max() < -(-tiny.chrom_sizes["mmSyn1"][chrom] // BIN)
        repeated += int((np.diff(got["mouse_bin"]) == 0).sum())
    assert repeated > 0


def test_methods_example():
    """The paper's example: mm10 120-215 <-> hg38 72-167 gives mouse [4, 8), human [2, 6);
    blocks under 25 bp are dropped."""
    blocks = {
        "human_chrom": np.array(["chr2", "chr1"]),
        "mouse_chrom": np.array(["chr1", "chr1"]),
        "human_start": np.array([72, 500]),
        "mouse_start": np.array([120, 40]),
        "size": np.array([95, 24]),
    }
    got = S._align_bins(blocks, 25, ["chr1", "chr2"])
    assert got["chr1.mouse_bin"].tolist() == [4, 5, 6, 7]
    assert got["chr1.human_bin"].tolist() == [2, 3, 4, 5]
    assert got["chr1.human_chrom"].tolist() == ["chr2"] * 4
    assert len(got["chr2.mouse_bin"]) == 0


# ---------------------------------------------------------------------- determinism, errors
def test_determinism_and_overwrite(tiny, tmp_path):
    out = tmp_path / "again"
    S.generate(out, seed=0, params=S.SynthParams.tiny())
    same = [
        "manifest.tsv",
        "truth/truth.json",
        "truth_alignment.npz",
        S.CHAIN_PATH,
        "genomes/hsSyn1.chrom.sizes",
        "genomes/mmSyn1.chrom.sizes",
    ]
    same += [str(p.relative_to(tiny.out)) for p in (tiny.out / "truth").rglob("*.npy")]
    for rel in same:
        assert (out / rel).read_bytes() == (tiny.out / rel).read_bytes(), rel
    synth_a = (tiny.out / "synth.json").read_text()
    assert (out / "synth.json").read_text() == synth_a

    with pytest.raises(InputDataError, match=f"{out.name}: directory is not empty"):
        S.generate(out, seed=1, params=S.SynthParams.tiny())
    (out / "keep.txt").write_text("user file")
    S.generate(out, seed=1, params=S.SynthParams.tiny(), overwrite=True)
    assert (out / "keep.txt").read_text() == "user file"
    assert not list(out.rglob(".*tmp-*"))
    differs = [(out / rel).read_bytes() != (tiny.out / rel).read_bytes() for rel in same]
    assert all(differs[2:5])  # alignment, chain and sizes change with the seed
    assert all(differs[6:])  # every truth array changes
    stale = {p.name for p in (out / "tracks").rglob("*.bw")}
    listed = {
        Path(line.split("\t")[-1]).name
        for line in (out / "manifest.tsv").read_text().splitlines()[1:]
    }
    assert stale == listed  # no bigWig left over from the first run


def test_errors(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputDataError, match="not a directory"):
        S.generate(f, params=S.SynthParams.tiny())
    with pytest.raises(ConfigError, match="non-negative integer"):
        S.generate(tmp_path / "x", seed=-1, params=S.SynthParams.tiny())
    with pytest.raises(ConfigError, match=r"human_only_assays \['FOO'\] are not in assays"):
        S.SynthParams.tiny(human_only_assays=("FOO",)).check()
    with pytest.raises(ConfigError, match="mouse_experiments out of range"):
        S.SynthParams.tiny(mouse_experiments=500).check()
    with pytest.raises(ConfigError, match="human_genome_bp too small"):
        S.generate(tmp_path / "y", params=S.SynthParams.tiny(human_genome_bp=100_000))
    with pytest.raises(ConfigError, match="unknown name"):
        S.SynthParams.preset("huge")
    with pytest.raises(ConfigError, match="unknown assays"):
        S.SynthParams.tiny(assays=("H3K4me3", "H3K4me2")).check()
    with pytest.raises(Exception, match="extra"):
        S.SynthParams(unknown_key=1)


def test_extra_protein_binding_params():
    p = S.SynthParams.tiny(extra_protein_binding=3, human_experiments=50, mouse_experiments=40)
    p.check()
    assert p.all_assays()[-3:] == ("TF01", "TF02", "TF03")
    assert all(s.category == "protein_binding" for s in p.assay_specs()[-3:])
    for name in S.PRESETS:
        S.SynthParams.preset(name).check()
    bench = S.SynthParams.preset("bench")
    assert bench.human_experiments + bench.mouse_experiments == 200


def test_default_generate(tmp_path):
    res = S.generate(tmp_path / "default", seed=0)
    p = S.SynthParams()
    assert res.experiments == {"human": p.human_experiments, "mouse": p.mouse_experiments}
    assert len(res.chrom_sizes["mmSyn1"]) == 3 and len(res.chrom_sizes["hsSyn1"]) == 4
    df = read_manifest(res.manifest)
    per_assay = df[df["species"] == "mouse"].groupby("assay").size()
    evaluable = per_assay[per_assay >= 3]
    assert len(evaluable) >= len(p.mouse_assays()) - len(p.mouse_rare_assays)
    assert res.counts["minus_strand_chains"] > 0 and res.counts["short_blocks"] > 0
    assert res.counts["duplicated_fragments"] > 0
    # about 40% of mouse bins align to human, as for hg38/mm10
    assert 0.2 < res.counts["aligned_mouse_bins"] / res.counts["bins"]["mouse"] < 0.6


# ------------------------------------------------------------------------------ noise floor
def test_clean_curve_is_the_expected_noisy_value():
    """The noiseless signal is E[arcsinh(raw) | S]: checked against a Monte-Carlo average of
    the generator's noise model."""
    rng = np.random.default_rng(0)
    for noise, bg in [(0.3, 0.3), (0.8, 0.05)]:
        u, f = S._clean_curve(noise, bg)
        for signal in (0.0, 2.0, 30.0):
            z0, z1 = rng.standard_normal((2, 1_000_000))
            raw = signal * np.exp(noise * z0 - noise**2 / 2) + bg * np.maximum(z1 + 0.3, 0)
            mc = np.arcsinh(raw)
            se = mc.std() / np.sqrt(mc.size)
            assert abs(np.interp(np.arcsinh(signal), u, f) - mc.mean()) < 4 * se + 1e-4


def test_noise_floor_is_the_best_any_prediction_does(tiny):
    index = S.read_truth_index(tiny.out)
    mouse = index["species"]["mouse"]
    chrom = next(iter(mouse["chroms"]))
    truth = S.read_truth(tiny.out, "mouse", chrom, mmap=False).astype(np.float64)
    clean = S.read_truth(tiny.out, "mouse", chrom, clean=True, mmap=False).astype(np.float64)
    assert truth.shape == clean.shape
    b, a = mouse["biosamples"][1], mouse["assays"][0]
    bi, ai = 1, 0
    floor = S.noise_floor(tiny.out, "mouse", chrom, b, a, truth_index=index)
    assert floor == pytest.approx(np.mean((truth[bi, ai] - clean[bi, ai]) ** 2), rel=1e-5)
    assert floor > 0
    # the clean signal beats shrunk or shifted versions of itself, and the truth's own mean
    for other in (0.9 * clean[bi, ai], clean[bi, ai] + 0.05, np.full_like(clean[bi, ai], 1.0)):
        assert np.mean((truth[bi, ai] - other) ** 2) > floor
    # residuals have no bias: the clean signal is the conditional mean
    assert abs(np.mean(truth - clean)) < 0.01
    with pytest.raises(InputDataError, match="assay 'nope' not in mouse"):
        S.noise_floor(tiny.out, "mouse", chrom, b, "nope")
