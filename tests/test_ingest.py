"""Ingest through the real Ray Data pipeline: correctness, resume, bad input, real files."""

import os
import time

import numpy as np
import pytest

from epiray.bigwig import write_bigwig
from epiray.errors import InputDataError, StoreError
from epiray.ingest import AssemblySpec, IngestConfig, Policies, ingest
from tests.conftest import write_tsv

pytestmark = pytest.mark.ray


def cfg_for(manifest, store, **kw):
    return IngestConfig(manifest=str(manifest), store=str(store), chroms="all", **kw)


def test_ingest_exact_and_float16_error(tmp_path, small_bigwigs, ray_local):
    manifest, sizes, truth = small_bigwigs
    s = ingest(cfg_for(manifest, tmp_path / "s32"))
    assert sorted(s.experiments()["experiment"]) == sorted(truth)
    for e, tracks in truth.items():
        for c, raw in tracks.items():
            got = s.read("toy1", c, [e])[0]
            np.testing.assert_allclose(got, np.arcsinh(raw), rtol=1e-6)
    s16 = ingest(cfg_for(manifest, tmp_path / "s16", dtype="float16"))
    a = s16.read("toy1", "chr1", list(truth))
    b = s.read("toy1", "chr1", list(truth))
    err = np.abs(a - b).max()
    recorded = max(
        st["cast_max_abs_err"]
        for v in s16.summary["experiments"].values()
        for st in v["chroms"].values()
    )
    assert 0 < err <= recorded + 1e-7 and recorded < 4e-3  # float16: ~11 bits of mantissa
    assert (s16.root / "manifest.tsv").is_file()


def test_resume_skips_finished_and_reingests_changed(tmp_path, small_bigwigs, ray_local):
    manifest, sizes, truth = small_bigwigs
    store = tmp_path / "s"
    s = ingest(cfg_for(manifest, store))
    part = s.part_path("toy1", "chr1", "B1.CTCF")
    other = s.part_path("toy1", "chr1", "B1.H3K4me3")
    m_part, m_other = part.stat().st_mtime_ns, other.stat().st_mtime_ns
    with pytest.raises(StoreError, match="already exists"):
        ingest(cfg_for(manifest, store))
    # a crash: one part lost; resume writes only that one
    part.unlink()
    time.sleep(0.01)
    ingest(cfg_for(manifest, store), resume=True)
    assert part.is_file() and other.stat().st_mtime_ns == m_other
    # a changed source: only that experiment is re-ingested
    new = {c: v + 1.0 for c, v in truth["B1.CTCF"].items()}
    write_bigwig(manifest.parent / "B1.CTCF.bw", sizes, new, 25)
    os.utime(manifest.parent / "B1.CTCF.bw")
    s = ingest(cfg_for(manifest, store), resume=True)
    np.testing.assert_allclose(
        s.read("toy1", "chr2", ["B1.CTCF"])[0], np.arcsinh(new["chr2"]), rtol=1e-6
    )
    assert other.stat().st_mtime_ns == m_other
    assert part.stat().st_mtime_ns != m_part


def test_failed_first_ingest_does_not_block_its_fix(tmp_path, small_bigwigs, ray_local):
    """Issue 18: a corrupt bigWig found during the first ingest leaves a store that finished
    nothing; after fixing the manifest the same command (no --overwrite / --resume) runs."""
    manifest, sizes, truth = small_bigwigs
    broken = manifest.parent / "B1.CTCF.broken.bw"
    broken.write_bytes((manifest.parent / "B1.CTCF.bw").read_bytes()[:3000])
    m_broken = manifest.parent / "m_broken.tsv"
    m_broken.write_text(manifest.read_text().replace("B1.CTCF.bw", broken.name))
    store = tmp_path / "s"
    with pytest.raises(
        InputDataError, match=r"experiment B1.CTCF \(.*B1.CTCF.broken.bw\).*corrupt or truncated"
    ):
        ingest(cfg_for(m_broken, store))
    assert [p.name for p in store.iterdir()] == ["store.json"]  # what the failed run left
    # the fixed manifest, the same command
    s = ingest(cfg_for(manifest, store))
    assert sorted(s.experiments()["experiment"]) == sorted(truth)
    for e, tracks in truth.items():
        for c, raw in tracks.items():
            np.testing.assert_allclose(s.read("toy1", c, [e])[0], np.arcsinh(raw), rtol=1e-6)
    # a store with finished parts is still protected, even one whose summary lists none yet
    # (a run interrupted after its first parts)
    with pytest.raises(StoreError, match="already exists.*--overwrite.*--resume"):
        ingest(cfg_for(manifest, store))
    s.summary["experiments"] = {}
    s.save_summary()
    with pytest.raises(StoreError, match="already exists.*--overwrite.*--resume"):
        ingest(cfg_for(manifest, store))
    assert s.part_path("toy1", "chr1", "B1.CTCF").is_file()
    # a folder holding anything else is not replaced either, and the error says it is no store
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"not an epiray store \(no store.json\).*--overwrite"):
        ingest(cfg_for(manifest, other))
    assert (other / "notes.txt").read_text() == "mine"


def test_add_experiments_later(tmp_path, small_bigwigs, ray_local):
    manifest, sizes, truth = small_bigwigs
    store = tmp_path / "s"
    ingest(cfg_for(manifest, store))
    before = {p: p.stat().st_mtime_ns for p in (store / "tracks").rglob("*.parquet")}
    write_bigwig(tmp_path / "B3.H3K4me3.bw", sizes, truth["B2.H3K4me3"], 25)
    m2 = write_tsv(
        tmp_path / "m2.tsv",
        [
            {
                "experiment": "B3.H3K4me3",
                "species": "mouse",
                "assembly": "toy1",
                "biosample": "B3",
                "assay": "H3K4me3",
                "category": "histone_modification",
                "path": "B3.H3K4me3.bw",
            }
        ],
    )
    s = ingest(cfg_for(m2, store), resume=True)
    assert len(s.experiments()) == 4
    assert {p: p.stat().st_mtime_ns for p in before} == before
    np.testing.assert_array_equal(
        s.read("toy1", "chr1", ["B3.H3K4me3"]), s.read("toy1", "chr1", ["B2.H3K4me3"])
    )


def _one(tmp_path, path, **kw):
    row = {
        "experiment": "X.H3K4me3",
        "species": "mouse",
        "assembly": "toy1",
        "biosample": "X",
        "assay": "H3K4me3",
        "category": "histone_modification",
        "path": str(path),
        **kw,
    }
    return write_tsv(tmp_path / "m_bad.tsv", [row])


def test_nan_negative_and_wrong_length_arrays(tmp_path, small_bigwigs, ray_local):
    manifest, sizes, _ = small_bigwigs
    nb = -(-sizes["chr2"] // 25)
    x = np.ones(nb)
    x[7] = np.nan
    np.savez(tmp_path / "nan.npz", chr2=x)
    cfg = IngestConfig(
        manifest=str(_one(tmp_path, tmp_path / "nan.npz")),
        store=str(tmp_path / "s1"),
        chroms=["chr2"],
        assemblies={
            "toy1": AssemblySpec(chrom_sizes=str(manifest.parent / "genomes/toy1.chrom.sizes"))
        },
    )
    with pytest.raises(
        InputDataError,
        match=r"experiment X.H3K4me3 \(.*nan.npz\) chrom chr2: "
        r"1 NaN/inf values \(first at bin 7",
    ):
        ingest(cfg)
    s = ingest(cfg.model_copy(update={"policies": Policies(nonfinite="zero")}), overwrite=True)
    assert s.read("toy1", "chr2", ["X.H3K4me3"])[0, 7] == 0.0
    assert s.summary["experiments"]["X.H3K4me3"]["chroms"]["chr2"]["n_nonfinite"] == 1

    x = np.ones(nb)
    x[3] = -2.0
    np.savez(tmp_path / "neg.npz", chr2=x)
    cfg = cfg.model_copy(update={"manifest": str(_one(tmp_path, tmp_path / "neg.npz"))})
    with pytest.raises(InputDataError, match=r"neg.npz\) chrom chr2: 1 negative values.*clip"):
        ingest(cfg, overwrite=True)
    s = ingest(cfg.model_copy(update={"policies": Policies(negative="clip")}), overwrite=True)
    assert s.read("toy1", "chr2", ["X.H3K4me3"])[0, 3] == 0.0

    np.savez(tmp_path / "short.npz", chr2=np.ones(nb - 1))
    cfg = cfg.model_copy(update={"manifest": str(_one(tmp_path, tmp_path / "short.npz"))})
    with pytest.raises(
        InputDataError,
        match=rf"short.npz\) chrom chr2: pre-binned array has "
        rf"the wrong length; expected {nb} bins",
    ):
        ingest(cfg, overwrite=True)


def test_header_problems_reported_together(tmp_path, small_bigwigs, shared_data, ray_local):
    manifest, sizes, _ = small_bigwigs
    (tmp_path / "trunc.bw").write_bytes((manifest.parent / "B1.CTCF.bw").read_bytes()[:3000])
    write_bigwig(
        tmp_path / "nochr2.bw",
        {"chr1": sizes["chr1"]},
        {"chr1": np.zeros(-(-sizes["chr1"] // 25))},
        25,
    )
    write_bigwig(
        tmp_path / "long.bw", {"chr1": sizes["chr1"] + 100, "chr2": sizes["chr2"]}, {}, 25
    )
    rows = [
        {
            "experiment": e,
            "species": "mouse",
            "assembly": "toy1",
            "biosample": "B9",
            "assay": a,
            "category": "other",
            "path": p,
        }
        for e, a, p in [
            ("T1", "A1", "trunc.bw"),
            ("T2", "A2", "nochr2.bw"),
            ("T3", "A3", "long.bw"),
        ]
    ]
    m = write_tsv(tmp_path / "bad.tsv", rows)
    (tmp_path / "genomes").mkdir(exist_ok=True)
    (tmp_path / "genomes/toy1.chrom.sizes").write_text(
        (manifest.parent / "genomes/toy1.chrom.sizes").read_text()
    )
    with pytest.raises(InputDataError) as ei:
        ingest(cfg_for(m, tmp_path / "s"))
    msg = str(ei.value)
    assert "3 problem(s)" in msg
    assert "experiment T1" in msg and "corrupt or truncated" in msg
    assert "experiment T2" in msg and "chrom chr2: chromosome 'chr2' not found" in msg
    assert "experiment T3" in msg and f"expected {sizes['chr1']}, got {sizes['chr1'] + 100}" in msg
    # zero-filling a missing chromosome is an explicit, warned policy
    m2 = write_tsv(tmp_path / "ok.tsv", [rows[1]])
    with pytest.warns(UserWarning, match="filled with zeros"):
        s = ingest(cfg_for(m2, tmp_path / "s2", policies=Policies(missing_chroms="zeros")))
    assert s.summary["experiments"]["T2"]["chroms"]["chr2"]["filled_zeros"] is True


# --------------------------------------------------------------------------- real files
def _real_manifest(tmp_path, shared_data, rows):
    bw = shared_data / "bigwig"
    return write_tsv(
        tmp_path / f"m{len(list(tmp_path.glob('m*.tsv')))}.tsv",
        [
            {
                "experiment": e,
                "species": sp,
                "assembly": asm,
                "biosample": b,
                "assay": a,
                "category": "other",
                "path": str(bw / f),
            }
            for e, sp, asm, b, a, f in rows
        ],
    )


def test_every_shared_bigwig_ingests_under_its_true_assembly(tmp_path, shared_data, ray_local):
    g = shared_data / "genomes"
    store = tmp_path / "s"
    k = "bigwig_chr9_4000000_6000000_K562_"
    groups = [
        (
            "hg19",
            ["chr9"],
            "ucsc",
            [("K562.H3K27ac", "H3K27ac"), ("K562.H3K27me3", "H3K27me3"), ("K562.RNA", "RNA")],
            k,
        ),
        ("hg38", ["chr9"], "ucsc", [("K562.H3K4me3", "H3K4me3")], k),
        ("hg38", ["chr17"], "ucsc", [("valid", "valid")], ""),
        ("hg38", ["chr1"], "ucsc", [("fixedStep", "fixedStep"), ("nozooms", "nozooms")], ""),
        ("hg19", ["chr1"], "ucsc", [("test04", "test04_hg19")], ""),
        ("hg19", ["chr1"], "ensembl", [("test04_noChr", "test04_hg19.noChr")], ""),
        ("mm10", ["chr1", "chr10"], "ensembl", [("test", "test")], ""),
    ]
    for i, (asm, chroms, style, exps, prefix) in enumerate(groups):
        sp = "mouse" if asm == "mm10" else "human"
        rows = []
        for e, f in exps:
            name = (
                f"{prefix}{f}.bigwig"
                if prefix
                else next(
                    p.name
                    for p in (shared_data / "bigwig").iterdir()
                    if p.stem == f and p.suffix.lower() in (".bw", ".bigwig")
                )
            )
            rows.append((e, sp, asm, f"bs{i}", e, name))
        m = _real_manifest(tmp_path, shared_data, rows)
        cfg = IngestConfig(
            manifest=str(m),
            store=str(store),
            chroms=chroms,
            assemblies={
                asm: AssemblySpec(chrom_sizes=str(g / f"{asm}.chrom.sizes"), chrom_names=style)
            },
        )
        s = ingest(cfg, resume=True)
    assert len(s.experiments()) == 10
    np.testing.assert_array_equal(
        s.read("hg19", "chr1", ["test04"]), s.read("hg19", "chr1", ["test04_noChr"])
    )
    k27 = s.read("hg19", "chr9", ["K562.H3K27ac"], 4_000_000 // 25, 6_000_000 // 25)
    assert k27.max() > 1 and np.count_nonzero(k27) > 1000
    assert s.read("mm10", "chr10", ["test"]).shape == (1, 5_227_800)


def test_k562_h3k4me3_declared_hg19_is_refused(tmp_path, shared_data, ray_local):
    m = _real_manifest(
        tmp_path,
        shared_data,
        [
            (
                "K562.H3K4me3",
                "human",
                "hg19",
                "K562",
                "H3K4me3",
                "bigwig_chr9_4000000_6000000_K562_H3K4me3.bigwig",
            )
        ],
    )
    cfg = IngestConfig(
        manifest=str(m),
        store=str(tmp_path / "s"),
        chroms=["chr9"],
        assemblies={
            "hg19": AssemblySpec(chrom_sizes=str(shared_data / "genomes/hg19.chrom.sizes"))
        },
    )
    with pytest.raises(
        InputDataError,
        match=r"experiment K562.H3K4me3 \(.*H3K4me3.bigwig\) "
        r"chrom chr9: chromosome length disagrees with assembly hg19; expected "
        r"141213431, got 138394717",
    ):
        ingest(cfg)


def test_chr_naming_needs_the_explicit_option(tmp_path, shared_data, ray_local):
    m = _real_manifest(
        tmp_path, shared_data, [("t", "human", "hg19", "b", "a", "test04_hg19.noChr.bigwig")]
    )
    cfg = IngestConfig(
        manifest=str(m),
        store=str(tmp_path / "s"),
        chroms=["chr1"],
        assemblies={
            "hg19": AssemblySpec(chrom_sizes=str(shared_data / "genomes/hg19.chrom.sizes"))
        },
    )
    with pytest.raises(
        InputDataError,
        match=r"chromosome 'chr1' not found in the file.*"
        r"chrom_names: ensembl",
    ):
        ingest(cfg)


def test_roadmap_pilot_bit_exact(tmp_path, shared_data, ray_local):
    pilot = sorted((shared_data / "roadmap-pilot").glob("*.npz"))
    assert len(pilot) == 25
    rows = []
    for p in pilot:
        bio, assay = p.name.split(".")[:2]
        rows.append(
            {
                "experiment": f"{bio}.{assay}",
                "species": "human",
                "assembly": "hg19pilot",
                "biosample": bio,
                "assay": assay,
                "category": "histone_modification",
                "path": str(p),
                "transform": "none",
            }
        )
    m = write_tsv(tmp_path / "pilot.tsv", rows)
    cfg = IngestConfig(
        manifest=str(m),
        store=str(tmp_path / "s"),
        chroms=["pilot"],
        assemblies={"hg19pilot": AssemblySpec(chrom_sizes={"pilot": 1_126_469 * 25})},
    )
    s = ingest(cfg)
    exps = [r["experiment"] for r in rows]
    X = s.read("hg19pilot", "pilot", exps)
    for i, p in enumerate(pilot):
        np.testing.assert_array_equal(X[i], np.load(p)["arr_0"])
