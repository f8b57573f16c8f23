"""Imputation: pairs, spills, bigWigs read back with pyBigWig, resume, crashes, errors, Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyBigWig
import pytest

from epiray.errors import ConfigError, EpirayError
from epiray.genome import Assembly
from epiray.impute import (
    PARTS,
    ImputeConfig,
    ModelPredictor,
    PairSpec,
    describe_outputs,
    impute,
    read_outputs,
    resolve_pairs,
    unobserved_pairs,
)
from epiray.store import Store, write_part

ROOT = Path(__file__).resolve().parents[1]

# Two assemblies; lengths are not multiples of 25, chr3 is shorter than one chunk.
MOUSE = {"chr1": 25 * 300 + 7, "chr2": 25 * 120, "chr3": 25 * 50 + 1}
HUMAN = {"chr1": 25 * 200 + 3}
EXPERIMENTS = [
    # experiment, biosample, assay, species, assembly, category
    ("mm.B1.H3K4me3", "mm.B1", "H3K4me3", "mouse", "mmToy1", "histone_modification"),
    ("mm.B2.H3K4me3", "mm.B2", "H3K4me3", "mouse", "mmToy1", "histone_modification"),
    ("mm.B2.CTCF", "mm.B2", "CTCF", "mouse", "mmToy1", "protein_binding"),
    ("mm.B3.DNase", "mm.B3", "DNase", "mouse", "mmToy1", "accessibility"),
    ("hs.B1.GATA1", "hs.B1", "GATA1", "human", "hsToy1", "protein_binding"),
    ("hs.B1.CTCF", "hs.B1", "CTCF", "human", "hsToy1", "protein_binding"),
]


def make_store(root: Path, seed: int = 0) -> Store:
    """A small two-species store written with the store's own writer (no Ray)."""
    rng = np.random.default_rng(seed)
    store = Store.create(root, block_bins=64)
    store.add_assembly(Assembly("mmToy1", "mouse", MOUSE), list(MOUSE))
    store.add_assembly(Assembly("hsToy1", "human", HUMAN), list(HUMAN))
    for exp, bio, assay, species, asm, cat in EXPERIMENTS:
        chroms = {}
        for chrom, length in (MOUSE if asm == "mmToy1" else HUMAN).items():
            vals = np.arcsinh(rng.gamma(1.0, 2.0, -(-length // 25))).astype(np.float32)
            write_part(
                store.part_path(asm, chrom, exp),
                vals,
                dtype="float32",
                block_bins=64,
                meta={"experiment": exp},
            )
            s = float(vals.sum(dtype=np.float64))
            chroms[chrom] = {"n": len(vals), "sum": s, "sumsq": float((vals**2).sum())}
        store.summary["experiments"][exp] = {
            "species": species,
            "assembly": asm,
            "biosample": bio,
            "assay": assay,
            "category": cat,
            "path": f"{exp}.bw",
            "checksum": f"sha256:{exp}",
            "chroms": chroms,
        }
    store.save_summary()
    return store


def expected(chrom: str, biosample: str, assay: str, lo: int, hi: int) -> np.ndarray:
    """The closed form :class:`WavePredictor` computes (float32, arcsinh scale)."""
    h = zlib.crc32(f"{biosample}/{assay}".encode()) % 1000 / 1000
    c = int(chrom.removeprefix("chr"))
    x = np.arange(lo, hi, dtype=np.float64)
    return (1.5 + np.sin(x / 7.0 + 6.28 * h) + 0.1 * c + 0.01 * (x % 13)).astype(np.float32)


class WavePredictor:
    """A deterministic torch predictor: a function of (chrom, pair, bin) only, so its values
    do not depend on how the bins are chunked or pairs batched."""

    calls: list[tuple[str, int, int, int]] = []  # (chrom, n_pairs, lo, hi), in-process only

    def __init__(self, chrom: str) -> None:
        self.chrom = chrom

    def predict_chrom(self, chrom, pairs, lo, hi):
        import torch  # imported here: Ray workers unpickling this class start faster

        assert chrom == self.chrom
        WavePredictor.calls.append((chrom, len(pairs), lo, hi))
        x = torch.arange(lo, hi, dtype=torch.float64)
        c = int(chrom.removeprefix("chr"))
        rows = []
        for b, a in pairs:
            h = zlib.crc32(f"{b}/{a}".encode()) % 1000 / 1000
            rows.append(1.5 + torch.sin(x / 7.0 + 6.28 * h) + 0.1 * c + 0.01 * (x % 13))
        return torch.stack(rows).float()


def wave_for(chrom: str) -> WavePredictor:
    return WavePredictor(chrom)


def numpy_wave(chrom: str, pairs, lo: int, hi: int) -> np.ndarray:
    """The same values as a plain callable predictor without torch (Ray workers that do not
    import torch start in a fraction of the time on a loaded 2-core machine)."""
    return np.stack([expected(chrom, b, a, lo, hi) for b, a in pairs])


def numpy_wave_for(chrom: str):
    return numpy_wave


class MissingModels:
    """``predictor_for`` whose models of some chromosomes were never trained."""

    def __init__(self, missing: set[str], use_torch: bool = True) -> None:
        self.missing, self.use_torch = missing, use_torch

    def __call__(self, chrom: str):
        if chrom in self.missing:
            raise FileNotFoundError(f"models/{chrom}/model.pt")
        return WavePredictor(chrom) if self.use_torch else numpy_wave


@pytest.fixture
def store(tmp_path) -> Store:
    return make_store(tmp_path / "store")


def config(store: Store, out: Path, **kw) -> ImputeConfig:
    base = dict(
        store=str(store.root),
        output_dir=str(out),
        model="models/run1",
        assembly="mmToy1",
        executor="local",
        chunk_bins=37,
        pair_batch=2,
    )
    return ImputeConfig(**{**base, **kw})


def read_bigwig(path: Path) -> tuple[dict[str, int], dict[str, list]]:
    bw = pyBigWig.open(str(path))
    try:
        chroms = dict(bw.chroms())
        return chroms, {c: bw.intervals(c) or [] for c in chroms}
    finally:
        bw.close()


# ----------------------------------------------------------------------------------- pairs
def test_unobserved_pairs_are_every_unobserved_combination(store):
    pairs = unobserved_pairs(store, "mmToy1")
    got = {(p.biosample, p.assay) for p in pairs}
    bios, assays = ["mm.B1", "mm.B2", "mm.B3"], ["CTCF", "DNase", "H3K4me3"]
    observed = {(b, a) for _, b, a, _, asm, _ in EXPERIMENTS if asm == "mmToy1"}
    assert got == {(b, a) for b in bios for a in assays} - observed
    assert len(pairs) == 9 - 4
    assert all(not p.observed and not p.zero_shot for p in pairs)
    assert {p.assay: p.category for p in pairs} == {
        "CTCF": "protein_binding",
        "DNase": "accessibility",
        "H3K4me3": "histone_modification",
    }
    assert [(p.biosample, p.assay) for p in pairs] == sorted(got)

    zs = unobserved_pairs(store, "mmToy1", zero_shot_assays=True)
    extra = [p for p in zs if p not in pairs]
    assert {(p.biosample, p.assay) for p in extra} == {(b, "GATA1") for b in bios}
    assert all(p.zero_shot and p.category == "protein_binding" for p in extra)
    assert all(p.species == "mouse" and p.assembly == "mmToy1" for p in zs)

    human = unobserved_pairs(store, "hsToy1", zero_shot_assays=True)
    assert {(p.biosample, p.assay) for p in human} == {("hs.B1", "H3K4me3"), ("hs.B1", "DNase")}


def test_explicit_pairs_are_validated_all_at_once(store, tmp_path):
    cfg = config(
        store,
        tmp_path / "out",
        pairs=[
            PairSpec(biosample="mm.B1", assay="CTCF", species="mouse", assembly="mmToy1"),
            PairSpec(biosample="mm.B1", assay="H3K4me3"),  # observed: allowed
            PairSpec(biosample="mm.B2", assay="GATA1"),  # zero-shot: allowed
        ],
    )
    pairs = resolve_pairs(store, cfg)
    assert [(p.biosample, p.assay, p.observed, p.zero_shot) for p in pairs] == [
        ("mm.B1", "CTCF", False, False),
        ("mm.B1", "H3K4me3", True, False),
        ("mm.B2", "GATA1", False, True),
    ]
    bad = config(
        store,
        tmp_path / "out",
        pairs=[
            {"biosample": "mm.B9", "assay": "CTCF"},
            {"biosample": "mm.B1", "assay": "H3K9me9"},
            {"biosample": "mm.B1", "assay": "CTCF", "assembly": "hsToy1"},
            {"biosample": "mm.B1", "assay": "CTCF", "species": "human"},
        ],
    )
    with pytest.raises(ConfigError) as e:
        resolve_pairs(store, bad)
    msg = str(e.value)
    assert "5 problem(s)" in msg
    for part in ("unknown biosample", "mm.B9", "unknown assay", "H3K9me9", "'hsToy1'", "human"):
        assert part in msg
    assert "listed twice" in msg


def test_config_rejects_unknown_keys_and_both_modes(store, tmp_path):
    from epiray.config import parse_config

    with pytest.raises(ConfigError, match="chunks: unknown key"):
        parse_config(ImputeConfig, {**config(store, tmp_path).model_dump(), "chunks": 5})
    with pytest.raises(ConfigError, match="overwrite and resume both set"):
        impute(config(store, tmp_path / "o", overwrite=True, resume=True), wave_for)


# ----------------------------------------------------------------------------------- bigWigs
def check_bigwig(path: Path, sizes: dict[str, int], chroms, bio, assay, transform=None):
    header, intervals = read_bigwig(path)
    assert header == sizes
    for chrom, length in sizes.items():
        iv = intervals[chrom]
        if chrom not in chroms:
            assert iv == []
            continue
        nb = -(-length // 25)
        starts = np.array([s for s, _, _ in iv])
        ends = np.array([e for _, e, _ in iv])
        vals = np.array([v for _, _, v in iv], dtype=np.float32)
        assert len(iv) == nb
        np.testing.assert_array_equal(starts, np.arange(nb) * 25)
        np.testing.assert_array_equal(ends, np.minimum(np.arange(1, nb + 1) * 25, length))
        want = expected(chrom, bio, assay, 0, nb)
        if transform is not None:
            want = transform(want.astype(np.float64)).astype(np.float32)
        np.testing.assert_array_equal(vals, want)


def test_impute_writes_one_bigwig_per_pair_with_exact_values(store, tmp_path):
    out = tmp_path / "out"
    WavePredictor.calls.clear()
    res = impute(config(store, out, chroms=["chr1", "chr3"]), wave_for)
    pairs = unobserved_pairs(store, "mmToy1")
    assert sorted(p.name for p in out.glob("*.bw")) == sorted(
        f"{p.biosample}.{p.assay}.arcsinh.bw" for p in pairs
    )
    assert res.written == [out / p.filename("arcsinh") for p in pairs]
    assert res.bins_written == len(pairs) * (301 + 51)
    assert res.spills_written == 2 * len(pairs) and res.spills_reused == 0
    for p in pairs:
        check_bigwig(out / p.filename("arcsinh"), MOUSE, {"chr1", "chr3"}, p.biosample, p.assay)
    # memory bound: every call is at most pair_batch x chunk_bins
    assert max(n for _, n, _, _ in WavePredictor.calls) == 2
    assert max(hi - lo for *_, lo, hi in WavePredictor.calls) == 37
    # sidecar: provenance, date-free
    side = json.loads((out / pairs[0].filename("arcsinh")).with_suffix(".json").read_text())
    assert side["model"] == "models/run1"
    assert side["store_hash"] == store.store_hash
    assert side["scale"] == "arcsinh" and side["bin_size"] == 25
    assert side["chroms"] == ["chr1", "chr3"]
    assert side["chrom_sizes"] == [[c, n] for c, n in MOUSE.items()]
    assert side["size"] == (out / pairs[0].filename("arcsinh")).stat().st_size
    assert side["stats_arcsinh"]["chr3"]["n_bins"] == 51
    assert not any(k in side for k in ("date", "time", "created"))
    # spills are removed once the bigWigs are written, no temporaries are left
    assert not (out / PARTS).exists()
    assert not list(out.glob(".*"))


def test_signal_scale_is_sinh_of_arcsinh(store, tmp_path):
    out = tmp_path / "out"
    pair = [{"biosample": "mm.B3", "assay": "CTCF"}]
    impute(config(store, out, pairs=pair, scale="signal", keep_parts=True), wave_for)
    check_bigwig(out / "mm.B3.CTCF.signal.bw", MOUSE, set(MOUSE), "mm.B3", "CTCF", np.sinh)
    # the kept spills (arcsinh) give the arcsinh bigWig without predicting again
    WavePredictor.calls.clear()
    res = impute(config(store, out, pairs=pair, scale="arcsinh", resume=True), wave_for)
    assert WavePredictor.calls == [] and res.spills_reused == 3
    check_bigwig(out / "mm.B3.CTCF.arcsinh.bw", MOUSE, set(MOUSE), "mm.B3", "CTCF")
    a = read_bigwig(out / "mm.B3.CTCF.arcsinh.bw")[1]["chr2"]
    s = read_bigwig(out / "mm.B3.CTCF.signal.bw")[1]["chr2"]
    np.testing.assert_allclose(
        [v for *_, v in s], np.sinh(np.array([v for *_, v in a], np.float64)), rtol=1e-6
    )


def test_header_from_a_full_chrom_sizes_file(store, tmp_path):
    sizes = {**MOUSE, "chrX": 12_345, "chrM": 99}
    f = tmp_path / "mmToy1.chrom.sizes"
    f.write_text("".join(f"{c}\t{n}\n" for c, n in sizes.items()))
    out = tmp_path / "out"
    pair = [{"biosample": "mm.B1", "assay": "DNase"}]
    impute(config(store, out, pairs=pair, chrom_sizes=str(f), chroms=["chr2"]), wave_for)
    check_bigwig(out / "mm.B1.DNase.arcsinh.bw", sizes, {"chr2"}, "mm.B1", "DNase")

    f.write_text("chr1\t100\n")
    with pytest.raises(ConfigError, match=r"disagrees with the store.*chr1"):
        impute(config(store, tmp_path / "o2", pairs=pair, chrom_sizes=str(f)), wave_for)


class SpillWatcher(WavePredictor):
    """Records how many experiments hold spills whenever it is called."""

    seen: list[int] = []
    out: Path | None = None

    def predict_chrom(self, chrom, pairs, lo, hi):
        busy = [d for d in (self.out / PARTS).iterdir() if list(d.glob("*.npy"))]
        SpillWatcher.seen.append(len(busy))
        return super().predict_chrom(chrom, pairs, lo, hi)


def test_waves_bound_the_spill_folder(store, tmp_path):
    out = tmp_path / "out"
    SpillWatcher.out, SpillWatcher.seen = out, []
    res = impute(config(store, out, zero_shot_assays=True, pairs_per_wave=3), SpillWatcher)
    assert len(res.written) == 8 and res.spills_written == 8 * 3
    assert max(SpillWatcher.seen) == 3  # never more than one wave of experiments
    for p in unobserved_pairs(store, "mmToy1", zero_shot_assays=True):
        check_bigwig(out / p.filename("arcsinh"), MOUSE, set(MOUSE), p.biosample, p.assay)


# ----------------------------------------------------------------------------------- resume
def test_existing_outputs_resume_and_overwrite(store, tmp_path):
    out = tmp_path / "out"
    impute(config(store, out), wave_for)
    bws = sorted(out.glob("*.bw"))
    mtimes = {p: p.stat().st_mtime_ns for p in bws}

    with pytest.raises(ConfigError, match="already exist.*resume.*overwrite"):
        impute(config(store, out), wave_for)

    gone = bws[1]
    gone.unlink()
    WavePredictor.calls.clear()
    res = impute(config(store, out, resume=True), wave_for)
    assert res.written == [gone] and len(res.skipped) == len(bws) - 1
    assert {c for c, *_ in WavePredictor.calls} == set(MOUSE)
    assert all(n == 1 for _, n, _, _ in WavePredictor.calls)  # only the deleted pair
    for p in bws:
        if p != gone:
            assert p.stat().st_mtime_ns == mtimes[p]
    bio, assay = gone.name.split(".arcsinh")[0].rsplit(".", 1)
    check_bigwig(gone, MOUSE, set(MOUSE), bio, assay)

    # everything finished: nothing predicted, nothing written
    WavePredictor.calls.clear()
    res = impute(config(store, out, resume=True), wave_for)
    assert res.written == [] and WavePredictor.calls == []

    # a bigWig without its sidecar (killed between the two renames) is redone
    gone.with_suffix(".json").unlink()
    res = impute(config(store, out, resume=True), wave_for)
    assert res.written == [gone]

    # another model's outputs are never clobbered by resume
    with pytest.raises(ConfigError, match="made for another request.*models/run2"):
        impute(config(store, out, resume=True, model="models/run2"), wave_for)
    res = impute(config(store, out, overwrite=True, model="models/run2"), wave_for)
    assert len(res.written) == len(bws)
    assert {json.loads(p.with_suffix(".json").read_text())["model"] for p in bws} == {
        "models/run2"
    }


def test_missing_chrom_model_is_one_error_naming_it_and_resume_finishes(store, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(EpirayError) as e:
        impute(config(store, out), MissingModels({"chr2", "chr3"}))
    msg = str(e.value)
    assert type(e.value) is EpirayError
    assert "2 problem(s)" in msg
    assert "impute chrom 'chr2'" in msg and "impute chrom 'chr3'" in msg
    assert "models/chr2/model.pt" in msg and "resume" in msg
    # no hole: no bigWig at all, and chr1's spills are kept
    assert not list(out.glob("*.bw")) and not list(out.glob("*.json"))
    n_pairs = len(unobserved_pairs(store, "mmToy1"))
    assert len(list((out / PARTS).glob("*/chr1.npy"))) == n_pairs
    assert not list((out / PARTS).glob("*/chr2.npy"))

    # without resume the unfinished work is not silently discarded
    with pytest.raises(ConfigError, match="already exist"):
        impute(config(store, out), wave_for)
    WavePredictor.calls.clear()
    res = impute(config(store, out, resume=True), wave_for)
    assert {c for c, *_ in WavePredictor.calls} == {"chr2", "chr3"}
    assert res.spills_reused == n_pairs and len(res.written) == n_pairs
    for p in unobserved_pairs(store, "mmToy1"):
        check_bigwig(out / p.filename("arcsinh"), MOUSE, set(MOUSE), p.biosample, p.assay)


class BadShape(WavePredictor):
    def predict_chrom(self, chrom, pairs, lo, hi):
        return np.zeros((len(pairs), hi - lo + 1), np.float32)


class NonFinite(WavePredictor):
    def predict_chrom(self, chrom, pairs, lo, hi):
        out = super().predict_chrom(chrom, pairs, lo, hi).numpy()
        out[0, 0] = np.nan
        return out


@pytest.mark.parametrize(
    "factory, match",
    [
        (BadShape, r"- impute chrom 'chr1' bins \[0, 37\): predictor returned shape \(2, 38\)"),
        (NonFinite, r"- impute chrom 'chr1' bins \[0, 37\): predictor returned non-finite"),
        (lambda chrom: 42, r"- impute chrom 'chr1': predictor_for returned int"),
    ],
)
def test_bad_predictor_output_is_an_error_naming_the_chrom(store, tmp_path, factory, match):
    with pytest.raises(EpirayError, match=match):
        impute(config(store, tmp_path / "out", chroms=["chr1"]), factory)
    assert not list((tmp_path / "out").glob("*.bw"))


def test_a_crash_while_writing_leaves_no_visible_partial_file(store, tmp_path, monkeypatch):
    import epiray.impute as imp

    out = tmp_path / "out"
    pair = [{"biosample": "mm.B1", "assay": "CTCF"}]
    calls = []
    real = imp._Sinh.__array__

    def failing(self, dtype=None, copy=None):
        calls.append(1)
        if len(calls) == 2:  # chr1 entries are already in the file
            raise OSError("disk full")
        return real(self, dtype, copy)

    monkeypatch.setattr(imp._Sinh, "__array__", failing)
    with pytest.raises(EpirayError, match=r"mm.B1.CTCF.signal.bw: writing failed; OSError"):
        impute(config(store, out, pairs=pair, scale="signal"), wave_for)
    assert sorted(p.name for p in out.iterdir()) == [PARTS]  # no bigWig, sidecar or temp
    assert len(list((out / PARTS / "mm.B1.CTCF").glob("*.npy"))) == 3
    monkeypatch.undo()
    res = impute(config(store, out, pairs=pair, scale="signal", resume=True), wave_for)
    assert res.spills_reused == 3 and res.spills_written == 0
    check_bigwig(out / "mm.B1.CTCF.signal.bw", MOUSE, set(MOUSE), "mm.B1", "CTCF", np.sinh)


KILL_SCRIPT = """
import os, sys
from pathlib import Path
import epiray.impute as imp
from epiray.store import Store
from tests.test_impute import config, wave_for

real = imp._Sinh.__array__
n = []
def dying(self, dtype=None, copy=None):
    n.append(1)
    if len(n) == 2:
        os._exit(9)  # killed mid-write: no cleanup runs
    return real(self, dtype, copy)
imp._Sinh.__array__ = dying
cfg = config(Store.open(sys.argv[1]), Path(sys.argv[2]), pairs=[{"biosample": "mm.B1",
             "assay": "CTCF"}], scale="signal")
imp.impute(cfg, wave_for)
"""


def test_a_killed_writer_leaves_only_a_hidden_temporary_that_resume_removes(store, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(store.root), str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 9, r.stderr
    visible = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    assert visible == []
    hidden = [p.name for p in out.glob(".*.tmp-*")]
    assert len(hidden) == 1 and hidden[0].startswith(".mm.B1.CTCF.signal.bw.tmp-")
    pair = [{"biosample": "mm.B1", "assay": "CTCF"}]
    res = impute(config(store, out, pairs=pair, scale="signal", resume=True), wave_for)
    assert res.spills_reused == 3
    assert not list(out.glob(".*.tmp-*"))
    check_bigwig(out / "mm.B1.CTCF.signal.bw", MOUSE, set(MOUSE), "mm.B1", "CTCF", np.sinh)


# ----------------------------------------------------------------------------------- info
def test_describe_outputs(store, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(EpirayError, match="no imputed tracks"):
        describe_outputs(tmp_path)
    impute(config(store, out, zero_shot_assays=True, chroms=["chr1", "chr2"]), wave_for)
    text = describe_outputs(out)
    assert f"imputed tracks in {out}" in text
    assert (
        "assembly mmToy1 (mouse), scale arcsinh: 8 pairs (3 zero-shot assay, 0 observed)" in text
    )
    assert f"model models/run1, store hash {store.store_hash}: 8 pairs" in text
    assert "chr1: 8/8 pairs, 301 bins" in text and "chr2: 8/8 pairs, 120 bins" in text
    assert "no data: chr3" in text
    assert "GATA1 (protein_binding)" in text
    assert "track hub: none" in text
    assert len(read_outputs(out)) == 8
    # unfinished work is reported
    with pytest.raises(EpirayError):
        impute(
            config(store, out, pairs=[{"biosample": "mm.B1", "assay": "DNase"}], scale="signal"),
            MissingModels({"chr3"}),
        )
    assert "unfinished: 1 experiments with 2 chromosome spills" in describe_outputs(out)


# ----------------------------------------------------------------------------------- real model
def train_avocado(store: Store, assembly: str, chrom: str, ckpt: Path, epochs: int = 2) -> None:
    """Train a tiny Avocado on the store's tracks of one chromosome and checkpoint it."""
    import torch

    from epiray.loop import LoopParams, TrainState, fit, save_checkpoint
    from epiray.models import Vocabulary, chrom_data_from_numpy
    from epiray.models.avocado import Avocado, AvocadoParams

    torch.manual_seed(0)
    exps = store.experiments()
    target = exps[exps["assembly"] == assembly]
    vocab = Vocabulary.from_records(
        exps, chrom=chrom, n_bins=store.n_bins(assembly, chrom), assembly=assembly
    )
    values = store.read(assembly, chrom, list(target["experiment"]))
    keys = [vocab.experiment_index(e) for e in target["experiment"]]
    data = chrom_data_from_numpy(
        values, [k.biosample for k in keys], [k.assay for k in keys], chrom=chrom, device="cpu"
    )
    params = AvocadoParams(
        n_biosample_factors=4, n_assay_factors=4, n_genome_factors=(3, 2, 2), n_nodes=16
    )
    model = Avocado.build(params, vocab, data)
    state = fit(model, data, LoopParams(epochs=epochs, batch_size=64, patience=None))
    assert isinstance(state, TrainState)
    save_checkpoint(ckpt / f"{chrom}.pt", model, state)


class AvocadoModels:
    """``predictor_for`` over per-chromosome checkpoints, loaded inside the task."""

    def __init__(self, ckpt: Path) -> None:
        self.ckpt = Path(ckpt)

    def shard(self, chrom: str):
        import torch

        from epiray.loop import load_checkpoint
        from epiray.models import chrom_data_from_numpy

        path = self.ckpt / f"{chrom}.pt"
        if not path.is_file():
            raise EpirayError(
                f"model dir {self.ckpt}: no checkpoint for chrom {chrom!r}; expected {path}."
            )
        n = torch.load(path, weights_only=False)["vocab"]["n_bins"]
        data = chrom_data_from_numpy(np.zeros((0, n), np.float32), [], [], chrom=chrom)
        model, _ = load_checkpoint(path, data)
        return model, data

    def __call__(self, chrom: str) -> ModelPredictor:
        return ModelPredictor([self.shard(chrom)])


def test_model_predictor_over_shards(store, tmp_path):
    """Two worker shards tile a chromosome; the predictor stitches their predictions."""
    import torch

    from epiray.models import Vocabulary, chrom_data_from_numpy
    from epiray.models.avocado import Avocado, AvocadoParams

    torch.manual_seed(1)
    vocab = Vocabulary.from_records(store.experiments(), chrom="chr1", n_bins=301)
    params = AvocadoParams(
        n_biosample_factors=4, n_assay_factors=4, n_genome_factors=(3, 2, 2), n_nodes=16
    )
    shards = []
    for lo, hi in [(0, 200), (200, 301)]:
        data = chrom_data_from_numpy(
            np.zeros((1, 301), np.float32), [0], [0], chrom="chr1", lo=lo, hi=hi, n_bins=301
        )
        shards.append((Avocado.build(params, vocab, data), data))
    pred = ModelPredictor(shards[::-1])
    pairs = [("mm.B1", "CTCF"), ("hs.B1", "GATA1")]
    got = np.concatenate([pred.predict_chrom("chr1", pairs, lo, lo + 50) for lo in (0, 50)], 1)
    for i, (b, a) in enumerate(pairs):
        bi, ai = vocab.biosample_index(b), vocab.assay_index(a)
        want = torch.cat([m.predict(d, bi, ai) for m, d in shards]).numpy()
        np.testing.assert_array_equal(got[i], want[:100])
    assert pred.predict_chrom("chr1", pairs, 250, 301).shape == (2, 51)
    with pytest.raises(EpirayError, match="asked for chrom 'chr2'"):
        pred.predict_chrom("chr2", pairs, 0, 10)
    with pytest.raises(EpirayError, match="unknown assay 'H3K9me3'"):
        pred.predict_chrom("chr1", [("mm.B1", "H3K9me3")], 0, 10)
    with pytest.raises(EpirayError, match="tiled from 0 to n_bins = 301"):
        ModelPredictor(shards[:1])
    # bf16 predictions: bf16 rounding of the float32 ones, no more
    bf = ModelPredictor(shards, autocast="bf16")
    lo_prec = bf.predict_chrom("chr1", pairs, 0, 301)
    assert bf.precision.bf16 and not pred.precision.bf16
    full = pred.predict_chrom("chr1", pairs, 0, 301)
    assert not np.array_equal(lo_prec, full)
    np.testing.assert_allclose(lo_prec, full, rtol=0.02, atol=0.02 * np.abs(full).max())


def test_trained_avocado_checkpoints_to_bigwigs(store, tmp_path):
    ckpt = tmp_path / "models"
    for chrom in ("chr1", "chr2"):
        train_avocado(store, "mmToy1", chrom, ckpt, epochs=1)
    out = tmp_path / "out"
    models = AvocadoModels(ckpt)
    with pytest.raises(EpirayError, match=r"chrom 'chr3'.*no checkpoint for chrom 'chr3'"):
        impute(config(store, out, zero_shot_assays=True, chunk_bins=100), models)
    res = impute(
        config(store, out, zero_shot_assays=True, resume=True, chroms=["chr1", "chr2"]), models
    )
    assert len(res.written) == 8
    for chrom in ("chr1", "chr2"):
        model, data = models.shard(chrom)
        for p in unobserved_pairs(store, "mmToy1", zero_shot_assays=True):
            b, a = model.vocab.biosample_index(p.biosample), model.vocab.assay_index(p.assay)
            want = model.predict(data, b, a).numpy()
            _, iv = read_bigwig(out / p.filename("arcsinh"))
            np.testing.assert_array_equal(np.array([v for *_, v in iv[chrom]], np.float32), want)


# ----------------------------------------------------------------------------------- Ray
@pytest.mark.ray
def test_synthetic_compendium_on_ray_tasks(ray_local, tmp_path):
    """The tiny synthetic compendium ingested by the real Ray Data pipeline: its unobserved
    pairs, Ray prediction tasks identical to the in-process loop, errors that stay one
    EpirayError (no RayTaskError wrapper), and a valid track hub over the result."""
    from epiray import synthetic
    from epiray.ingest import IngestConfig, ingest
    from epiray.manifest import read_manifest
    from epiray.trackhub import check_trackhub, write_trackhub

    root = tmp_path
    synthetic.generate(root / "data", seed=3, params=synthetic.SynthParams.tiny())
    cfg = IngestConfig(
        manifest=str(root / "data" / "manifest.tsv"),
        store=str(root / "store"),
        chroms="all",
        assemblies={
            a: {"chrom_sizes": str(root / "data" / "genomes" / f"{a}.chrom.sizes")}
            for a in ("hsSyn1", "mmSyn1")
        },
    )
    store = ingest(cfg)
    man = read_manifest(store.root / "manifest.tsv")
    mouse = man[man["assembly"] == "mmSyn1"]
    bios, own = sorted(set(mouse["biosample"])), sorted(set(mouse["assay"]))
    human_only = sorted(set(man["assay"]) - set(own))
    assert human_only  # the tiny preset has zero-shot assays
    seen = set(zip(mouse["biosample"], mouse["assay"]))
    want = {(b, a) for b in bios for a in own + human_only} - seen
    pairs = unobserved_pairs(store, "mmSyn1", zero_shot_assays=True)
    assert {(p.biosample, p.assay) for p in pairs} == want
    assert {p.assay for p in pairs if p.zero_shot} == set(human_only)

    out = tmp_path / "out"
    cfg = ImputeConfig(
        store=str(store.root),
        output_dir=str(out),
        model="synthetic-wave",
        assembly="mmSyn1",
        zero_shot_assays=True,
        executor="ray",
        pairs_per_task=7,
        chunk_bins=4096,
    )
    res = impute(cfg, numpy_wave_for)
    assert len(res.written) == len(want)
    sizes = store.chrom_sizes("mmSyn1")
    for p in pairs:
        check_bigwig(out / p.filename("arcsinh"), sizes, set(sizes), p.biosample, p.assay)
    hub = write_trackhub(out)
    assert check_trackhub(hub) == []

    bad = cfg.model_copy(update={"output_dir": str(tmp_path / "bad")})
    with pytest.raises(EpirayError) as e:
        impute(bad, MissingModels({"chr2"}, use_torch=False))
    assert type(e.value) is EpirayError  # not a RayTaskError wrapper
    msg = str(e.value)
    assert "1 problem(s)" in msg and "impute chrom 'chr2'" in msg and "Traceback" not in msg
