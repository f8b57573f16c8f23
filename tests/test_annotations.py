"""Annotation BED files -> bin masks: hand-computed small BEDs and the real challenge files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from epiray import annotations as A
from epiray.errors import InputDataError
from epiray.metrics import METRIC_NAMES, score_track

DATA = Path(__file__).resolve().parents[2] / "shared/data"
ANNOT = DATA / "annotations/hg38"
SIZES = DATA / "genomes/hg38.chrom.sizes"

CHROMS = {"chrA": 10_000, "chrB": 260}  # 400 and 11 bins


def _write(path: Path, lines: list[str], gz: bool = False) -> Path:
    text = "".join(line + "\n" for line in lines)
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def _mask(n: int, *ranges: tuple[int, int]) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    for a, b in ranges:
        m[a:b] = True
    return m


@pytest.fixture()
def genes(tmp_path: Path) -> Path:
    # GTF-style: start is the 1-based first base, end the 1-based last base
    return _write(
        tmp_path / "genes.bed.gz",
        [
            "chrA\t101\t250\tg1\t.\t+",  # bases [100, 250): bins 4..9; TSS bin 4
            "chrA\t5001\t5050\tg2\t.\t-",  # bases [5000, 5050): bins 200..201; TSS base 5049
            "chrA\t2500\t2600\tg3\t.\t+",  # bases [2499, 2600): bins 99..103; TSS bin 99
            "chrB\t1\t240\tg4\t.\t-",  # bases [0, 240): bins 0..9; TSS bin 9
        ],
        gz=True,
    )


def test_gene_bodies_convert_the_one_based_start(genes: Path):
    m = A.gene_masks(genes, CHROMS)
    assert set(m) == {"chrA", "chrB"}
    assert m["chrA"].shape == (400,) and m["chrB"].shape == (11,)
    np.testing.assert_array_equal(m["chrA"], _mask(400, (4, 10), (200, 202), (99, 104)))
    np.testing.assert_array_equal(m["chrB"], _mask(11, (0, 10)))
    # read as a 0-based BED: g3 would start at base 2500 = bin 100
    m0 = A.gene_masks(genes, CHROMS, one_based_start=False, chroms=["chrA"])
    assert list(m0) == ["chrA"]
    assert not m0["chrA"][99] and m0["chrA"][100]


def test_promoters_are_80_bins_upstream_strand_aware_tss_excluded(genes: Path):
    m = A.promoter_masks(genes, CHROMS)
    expected = _mask(
        400,
        (0, 4),  # g1 +: [4 - 80, 4) clipped at the chromosome start
        (202, 282),  # g2 -: TSS base 5049 = bin 201; [202, 282)
        (19, 99),  # g3 +: [99 - 80, 99)
    )
    np.testing.assert_array_equal(m["chrA"], expected)
    np.testing.assert_array_equal(m["chrB"], _mask(11, (10, 11)))  # clipped at the end
    assert not m["chrA"][4] and not m["chrA"][201] and not m["chrA"][99]  # TSS bins
    short = A.promoter_masks(genes, CHROMS, upstream_bins=2, bin_size=50)
    # bin_size 50: g3 TSS base 2499 -> bin 49, promoter bins 47..48
    assert short["chrA"].shape == (200,)
    assert np.flatnonzero(short["chrA"]).tolist() == [0, 1, 47, 48, 101, 102]


def test_enhancers_span_or_blocks_and_blacklist(tmp_path: Path):
    enh = _write(
        tmp_path / "enh.bed",
        [
            "track name=enhancers",
            "chrA\t1000\t1370\tchrA:1000-1370\t35\t.\t1300\t1301\t0,0,0\t2\t30,20\t0,350",
            "chrA\t5000\t5001\te2\t3\t.\t5000\t5001\t0,0,0\t1\t1\t0",
        ],
    )
    span = A.enhancer_masks(enh, CHROMS)
    # [1000, 1370) -> bins 40..54; [5000, 5001) -> bin 200
    np.testing.assert_array_equal(span["chrA"], _mask(400, (40, 55), (200, 201)))
    assert not span["chrB"].any()
    blocks = A.enhancer_masks(enh, CHROMS, blocks=True)
    # blocks [1000, 1030) -> bins 40, 41 and [1350, 1370) -> bin 54
    np.testing.assert_array_equal(blocks["chrA"], _mask(400, (40, 42), (54, 55), (200, 201)))
    bl = _write(tmp_path / "bl.bed", ["chrA\t25\t50", "chrA\t9990\t10000", "chrB\t100\t100"])
    m = A.blacklist_masks(bl, CHROMS)
    np.testing.assert_array_equal(m["chrA"], _mask(400, (1, 2), (399, 400)))
    assert not m["chrB"].any()  # an empty interval covers no bin


def test_interval_mask_matches_brute_force():
    rng = np.random.default_rng(0)
    n_bins, bs = 500, 25
    starts = rng.integers(0, n_bins * bs, 300)
    ends = np.minimum(starts + rng.integers(0, 400, 300), n_bins * bs)
    ref = np.zeros(n_bins, dtype=bool)
    for s, e in zip(starts, ends, strict=True):
        for base in range(s, e):
            ref[base // bs] = True
    np.testing.assert_array_equal(A.interval_mask(starts, ends, n_bins, bs), ref)


def test_region_masks_feed_score_track(genes: Path, tmp_path: Path):
    enh = _write(tmp_path / "enh.bed", ["chrA\t1000\t1370"])
    bl = _write(tmp_path / "bl.bed", ["chrA\t0\t50"])
    chrom_sizes = _write(tmp_path / "sizes", ["chrA\t10000", "chrB\t260"])
    rm = A.region_masks(chrom_sizes, genes=genes, enhancers=enh, blacklist=bl, chroms=["chrA"])
    assert set(rm) == {"chrA"} and set(rm["chrA"]) == {"prom", "gene", "enh", "blacklist"}
    rng = np.random.default_rng(1)
    y = rng.random(400).astype(np.float32)
    h = rng.random(400).astype(np.float32)
    res = score_track(y, h, masks=rm["chrA"])
    assert list(res) == list(METRIC_NAMES)
    keep = ~rm["chrA"]["blacklist"]
    d2 = (y.astype(np.float64) - h) ** 2
    assert res["mse_prom"] == pytest.approx(d2[keep & rm["chrA"]["prom"]].mean())
    assert res["mse"] == pytest.approx(d2[keep].mean())


def test_bad_annotations_raise_named_errors(tmp_path: Path, genes: Path):
    ens = _write(tmp_path / "ens.bed", ["1\t100\t200\tg\t.\t+"])
    with pytest.raises(InputDataError, match=r"(?s)ens.bed.*not in the chrom sizes.*\['1'\]"):
        A.gene_masks(ens, CHROMS)
    past = _write(tmp_path / "past.bed", ["chrB\t100\t300"])
    with pytest.raises(InputDataError, match=r"(?s)past.bed.*ends at 300 past the end of chrB"):
        A.blacklist_masks(past, CHROMS)
    strand = _write(tmp_path / "strand.bed", ["chrA\t100\t200\tgX\t.\t."])
    with pytest.raises(InputDataError, match=r"(?s)strand.bed.*\(gX\): strand is '\.'"):
        A.promoter_masks(strand, CHROMS)
    zero = _write(tmp_path / "zero.bed", ["chrA\t0\t200\tgZ\t.\t+"])
    with pytest.raises(InputDataError, match=r"(?s)\(gZ\): start is 0; expected a 1-based start"):
        A.gene_masks(zero, CHROMS)
    bad = _write(tmp_path / "bad.bed", ["chrA\t10\tx2", "chrA\t30\t20"])
    with pytest.raises(
        InputDataError, match=r"(?s)bad.bed: 2 problem.*end is 'x2'.*end 20 < start"
    ):
        A.blacklist_masks(bad, CHROMS)
    with pytest.raises(InputDataError, match=r"(?s)expected at least 12"):
        A.enhancer_masks(bad, CHROMS, blocks=True)
    with pytest.raises(InputDataError, match=r"(?s)nope.bed: file not found"):
        A.read_bed(tmp_path / "nope.bed")
    with pytest.raises(InputDataError, match=r"(?s)chromosome\(s\) \['chrZ'\] not in the chrom"):
        A.gene_masks(genes, CHROMS, chroms=["chrZ"])


# ---------------------------------------------------------------------------------------------
# the real ENCODE Imputation Challenge annotations


@pytest.fixture(scope="module")
def real():
    if not (ANNOT / A.CHALLENGE_FILES["gene"]).is_file() or not SIZES.is_file():
        pytest.skip("shared/data annotations not available")
    return A.challenge_region_masks(ANNOT, SIZES, chroms=["chr1", "chr10", "chr17", "chr21"])


def test_real_masks_shapes_and_known_genes(real):
    sizes = A._chrom_sizes(SIZES)
    for c, masks in real.items():
        for key, m in masks.items():
            assert m.dtype == bool and m.shape == (-(-sizes[c] // 25),), (c, key)
    # TP53, chr17:7661779-7687550 (-), GTF 1-based: TSS base 7687549 (0-based) -> bin 307501
    prom = real["chr17"]["prom"]
    assert prom[307502:307582].all()
    assert not prom[307501]  # the TSS bin itself (no other gene's promoter covers it)
    gene = real["chr17"]["gene"]
    assert gene[7661778 // 25 : 7687550 // 25 + 1].all()
    # DDX11L1, chr1:11869-14409 (+): TSS base 11868 -> bin 474; promoter bins 394..473
    assert real["chr1"]["prom"][394:474].all()
    assert not real["chr1"]["prom"][393] and not real["chr1"]["prom"][474]
    # a FANTOM5 enhancer chr10:100006233-100006603 -> bins 4000249..4000264 (whole span)
    assert real["chr10"]["enh"][4000249:4000265].all()
    # blacklist chr10:38528030-38529790 -> bins 1541121..1541191
    bl = real["chr10"]["blacklist"]
    assert bl[1541121:1541192].all() and not bl[1541120] and not bl[1541192]


def test_real_masks_agree_with_the_bed_lines(real):
    with gzip.open(ANNOT / A.CHALLENGE_FILES["gene"], "rt") as fh:
        rows = [line.split() for line in fh if line.startswith("chr21\t")]
    gene = np.zeros_like(real["chr21"]["gene"])
    prom = np.zeros_like(gene)
    n = gene.shape[0]
    for _, s, e, _, _, strand in rows:  # brute force, one gene at a time
        s0, e0 = int(s) - 1, int(e)
        gene[s0 // 25 : (e0 - 1) // 25 + 1] = True
        if strand == "+":
            t = s0 // 25
            prom[max(t - 80, 0) : t] = True
        else:
            t = (e0 - 1) // 25
            prom[t + 1 : min(t + 81, n)] = True
    np.testing.assert_array_equal(real["chr21"]["gene"], gene)
    np.testing.assert_array_equal(real["chr21"]["prom"], prom)
    assert 0.3 < gene.mean() < 0.6 and 0.02 < prom.mean() < 0.06
