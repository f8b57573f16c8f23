"""Chain files: parsing, validation, bin alignment (METHODS §2) and single-base liftOver."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from epiray.chain import (
    Chains,
    bin_blocks,
    check_chrom_sizes,
    iter_bin_blocks,
    liftover_points,
    read_chain,
)
from epiray.errors import ConfigError, InputDataError
from epiray.genome import read_chrom_sizes

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHAINS = DATA / "chains"
GENOMES = DATA / "genomes"
needs_data = pytest.mark.skipif(not CHAINS.is_dir(), reason="../shared/data is not available")


def write(path: Path, text: str, gz: bool = False) -> Path:
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def reference_blocks(path: Path) -> pd.DataFrame:
    """An independent, line-by-line chain reader (forward coordinates on both species)."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt") as f:
        for line in f:
            w = line.split()
            if not w or w[0].startswith("#"):
                continue
            if w[0] == "chain":
                tname, tpos = w[2], int(w[5])
                qname, qsize, qstrand, qpos = w[7], int(w[8]), w[9], int(w[10])
                continue
            size = int(w[0])
            q0 = qpos if qstrand == "+" else qsize - qpos - size
            rows.append((tname, tpos, qname, q0, qstrand, size))
            if len(w) == 3:
                tpos += size + int(w[1])
                qpos += size + int(w[2])
    return pd.DataFrame(
        rows, columns=["t_chrom", "t_start", "q_chrom", "q_start", "strand", "size"]
    )


def reference_pairs(h0, m0, size, strand, bin_size=25, minus_strand="mirrored"):
    """The documented rule, block by block, from the bases: + (and - under the paper's rule)
    pairs bins from the start (ascending together); mirrored - pairs each human bin with the
    mouse bin holding the partner of its centre base; only pairs inside both species'
    [start // 25, end // 25) are kept."""
    if size < bin_size:
        return []
    h1, m1 = h0 + size, m0 + size
    hb, mb = range(h0 // bin_size, h1 // bin_size), range(m0 // bin_size, m1 // bin_size)
    if strand == "+" or minus_strand == "paper":
        return list(zip(mb, hb))
    pairs = []
    for b in hb:
        centre = b * bin_size + (bin_size - 1) // 2
        partner = (h0 + m1 - 1) - centre  # human base x aligns to mouse base h0 + m1 - 1 - x
        if partner // bin_size in mb:
            pairs.append((partner // bin_size, b))
    return pairs


# ------------------------------------------------------------------------------ METHODS §2
def test_paper_example_both_orientations(tmp_path):
    # mm10 120-215 ~ hg38 72-167 -> mouse bins [4, 8) ~ human bins [2, 6)
    p = write(tmp_path / "hgToMm.chain", "chain 100 h1 1000 + 72 167 m1 1000 + 120 215 1\n95\n")
    al = bin_blocks(read_chain(p), "target_human")
    assert list(al) == ["m1"]
    assert al["m1"].mouse_bin.tolist() == [4, 5, 6, 7]
    assert al["m1"].human_bin.tolist() == [2, 3, 4, 5]
    assert al["m1"].human_chrom_names.tolist() == ["h1"] * 4
    assert al["m1"].mouse_bin.dtype == np.int64 and al["m1"].human_bin.dtype == np.int64
    p = write(tmp_path / "mmToHg.chain", "chain 100 m1 1000 + 120 215 h1 1000 + 72 167 1\n95\n")
    al = bin_blocks(read_chain(p), "target_mouse")
    assert al["m1"].mouse_bin.tolist() == [4, 5, 6, 7]
    assert al["m1"].human_bin.tolist() == [2, 3, 4, 5]


def test_extra_bin_dropped_and_short_blocks_discarded(tmp_path):
    text = (
        # human 10-60 -> bins [0, 2); mouse 30-80 -> bins [1, 3): equal counts
        "chain 9 h1 1000 + 10 60 m1 1000 + 30 80 1\n50\n\n"
        # human 100-149 -> [4, 5) (one bin); mouse 200-249 -> [8, 9): pair (8, 4)
        "chain 8 h1 1000 + 100 149 m1 1000 + 200 249 2\n49\n\n"
        # human 600-649 -> [24, 25); mouse 610-659 -> [24, 26): mouse has one extra, dropped
        "chain 7 h1 1000 + 600 649 m1 1000 + 610 659 3\n49\n\n"
        # 24 bp: discarded even though it straddles a bin boundary
        "chain 6 h1 1000 + 700 724 m1 1000 + 760 784 4\n24\n"
    )
    al = bin_blocks(read_chain(write(tmp_path / "x.chain", text)), "target_human")["m1"]
    got = list(zip(al.mouse_bin.tolist(), al.human_bin.tolist()))
    assert got == [(1, 0), (2, 1), (8, 4), (24, 24)]


def test_minus_strand_paper_rule_is_the_default(tmp_path):
    # the paper's example with the mouse on '-': forward 120-215 -> bins [4, 8), paired from
    # the start with human [2, 6) exactly as on '+' (METHODS §2 taken literally)
    p = write(tmp_path / "m.chain", "chain 1 h1 1000 + 72 167 m1 1000 - 785 880 1\n95\n")
    al = bin_blocks(read_chain(p), "target_human")["m1"]
    assert list(zip(al.mouse_bin.tolist(), al.human_bin.tolist())) == [
        (4, 2),
        (5, 3),
        (6, 4),
        (7, 5),
    ]
    al = bin_blocks(read_chain(p), "target_human", minus_strand="paper")["m1"]
    assert al.mouse_bin.tolist() == [4, 5, 6, 7]
    with pytest.raises(Exception, match="minus_strand 'x'"):
        bin_blocks(read_chain(p), "target_human", minus_strand="x")


def test_minus_strand_mirrored_pairs_run_backwards(tmp_path):
    # human + 72-167; mouse on '-': forward 120-215 on a 1000 bp chromosome (strand 785-880).
    # Human base 72 + k aligns to mouse base 214 - k. Human bin 3 (75-99) -> mouse 211-187:
    # 13 bases in mouse bin 7, 12 in bin 8; bin 2's majority partner, mouse bin 8, is partial
    # (excluded by 215 // 25 = 8), so the pairs are (7, 3), (6, 4), (5, 5).
    p = write(tmp_path / "m.chain", "chain 1 h1 1000 + 72 167 m1 1000 - 785 880 1\n95\n")
    chains = read_chain(p)
    assert chains.block_q_start_forward.tolist() == [120]
    al = bin_blocks(chains, "target_human", minus_strand="mirrored")["m1"]
    assert list(zip(al.mouse_bin.tolist(), al.human_bin.tolist())) == [(5, 5), (6, 4), (7, 3)]
    # human 20-120 ~ mouse forward 20-120 on '-': human bin 1's majority partner is the partial
    # mouse bin 4 (excluded), so only the majority pairs (3, 2) and (2, 3) remain
    text = "chain 1 h1 1000 + 20 120 m1 1000 - 880 980 1\n100\n"
    al = bin_blocks(
        read_chain(write(tmp_path / "c.chain", text)), "target_human", minus_strand="mirrored"
    )["m1"]
    assert list(zip(al.mouse_bin.tolist(), al.human_bin.tolist())) == [(2, 3), (3, 2)]
    # bin-aligned block: an exact reversal, and every aligned base is in its paired bins
    text = "chain 1 h1 1000 + 100 200 m1 1000 - 600 700 1\n100\n"
    al = bin_blocks(
        read_chain(write(tmp_path / "a.chain", text)), "target_human", minus_strand="mirrored"
    )["m1"]
    assert list(zip(al.mouse_bin.tolist(), al.human_bin.tolist())) == [
        (12, 7),
        (13, 6),
        (14, 5),
        (15, 4),
    ]
    k = np.arange(100)
    pairs = set(zip(al.mouse_bin.tolist(), al.human_bin.tolist()))
    assert all(((399 - i) // 25, (100 + i) // 25) in pairs for i in k)
    # the same block written mouse-target gives the same pairs
    text = "chain 1 m1 1000 + 120 215 h1 1000 - 833 928 1\n95\n"
    al2 = bin_blocks(
        read_chain(write(tmp_path / "b.chain", text)), "target_mouse", minus_strand="mirrored"
    )["m1"]
    assert list(zip(al2.mouse_bin.tolist(), al2.human_bin.tolist())) == [(5, 5), (6, 4), (7, 3)]


def random_chain(path: Path, n: int, seed: int, size: int = 2_000_000) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows, lines = [], []
    for i in range(n):
        length = int(rng.integers(10, 400))
        h0 = int(rng.integers(0, size - length))
        m0 = int(rng.integers(0, size - length))
        strand = "-" if rng.random() < 0.5 else "+"
        q = size - m0 - length if strand == "-" else m0
        hc, mc = f"h{i % 2 + 1}", f"m{i % 3 + 1}"
        lines.append(
            f"chain {n - i} {hc} {size} + {h0} {h0 + length} {mc} {size} {strand} {q} "
            f"{q + length} {i + 1}\n{length}\n\n"
        )
        rows.append((hc, h0, mc, m0, strand, length))
    write(path, "".join(lines), gz=True)
    return pd.DataFrame(rows, columns=["h", "h0", "m", "m0", "strand", "size"])


@pytest.mark.parametrize("minus_strand", ["mirrored", "paper"])
@pytest.mark.parametrize("orientation", ["target_human", "target_mouse"])
def test_random_blocks_match_reference_and_keep_bases_together(
    tmp_path, orientation, minus_strand
):
    blocks = random_chain(tmp_path / "r.chain.gz", 600, seed=3)
    if orientation == "target_mouse":  # the same alignment, written the other way round
        size = 2_000_000
        text = "".join(
            f"chain {600 - i} {b.m} {size} + {b.m0} {b.m0 + b.size} {b.h} {size} {b.strand} "
            f"{(size - b.h0 - b.size) if b.strand == '-' else b.h0} "
            f"{(size - b.h0) if b.strand == '-' else b.h0 + b.size} {i + 1}\n{b.size}\n\n"
            for i, b in enumerate(blocks.itertuples())
        )
        write(tmp_path / "r.chain.gz", text, gz=True)
    al = bin_blocks(read_chain(tmp_path / "r.chain.gz"), orientation, minus_strand=minus_strand)
    for m in ("m1", "m2", "m3"):
        sub = blocks[blocks.m == m]
        expect = [
            (mb, b.h, hb)
            for b in sub.itertuples()
            for mb, hb in reference_pairs(b.h0, b.m0, b.size, b.strand, 25, minus_strand)
        ]
        got = list(zip(al[m].mouse_bin.tolist(), al[m].human_chrom_names, al[m].human_bin))
        assert sorted(got) == sorted(expect)
        assert np.all(np.diff(al[m].mouse_bin) >= 0)
    # aligned bases fall in paired bins for most positions, on both strands
    pairs = {
        (m, mb, h, hb)
        for m, a in al.items()
        for mb, h, hb in zip(a.mouse_bin.tolist(), a.human_chrom_names, a.human_bin.tolist())
    }
    for strand in "+-" if minus_strand == "mirrored" else "+":
        hit = total = 0
        for b in blocks[(blocks.strand == strand) & (blocks["size"] >= 25)].itertuples():
            k = np.arange(b.size)
            mbase = b.m0 + k if strand == "+" else b.m0 + b.size - 1 - k
            hit += sum((b.m, x, b.h, y) in pairs for x, y in zip(mbase // 25, (b.h0 + k) // 25))
            total += b.size
        assert hit / total > 0.5, (strand, hit / total)


def test_ties_keep_file_order(tmp_path):
    # two human regions aligned to the same mouse bins: each mouse bin appears twice
    text = (
        "chain 9 h2 1000 + 0 50 m1 1000 + 100 150 1\n50\n\n"
        "chain 8 h1 1000 + 500 550 m1 1000 + 100 150 2\n50\n"
    )
    al = bin_blocks(read_chain(write(tmp_path / "d.chain", text)), "target_human")["m1"]
    assert al.mouse_bin.tolist() == [4, 4, 5, 5]
    assert al.human_chrom_names.tolist() == ["h2", "h1", "h2", "h1"]
    assert al.human_bin.tolist() == [0, 20, 1, 21]


# ------------------------------------------------------------------------------ real files
@needs_data
def test_hg38tohg19_counts_and_liftover_exact():
    chains = read_chain(
        CHAINS / "hg38ToHg19.over.chain.gz",
        read_chrom_sizes(GENOMES / "hg38.chrom.sizes"),
        read_chrom_sizes(GENOMES / "hg19.chrom.sizes"),
        target_assembly="hg38",
        query_assembly="hg19",
    )
    assert (chains.n_chains, chains.n_blocks) == (25_374, 185_795)
    assert int((chains.q_strand < 0).sum()) == 11_555
    inp = pd.read_csv(CHAINS / "hg38ToHg19.testinput.txt", sep=r"\s+", header=None)
    out = pd.read_csv(CHAINS / "hg38ToHg19.testoutput.txt", sep="\t", header=None)
    got = liftover_points(chains, inp[0].to_numpy(), inp[1].to_numpy())
    # liftOver flips the BED strand on a '-' chain
    strand = np.where(got["strand"] == "-", np.where(inp[5] == "+", "-", "+"), inp[5])
    mapped = got["n_hits"] == 1
    assert int((~mapped).sum()) == 9
    table = pd.DataFrame(
        {
            0: got["chrom"][mapped],
            1: got["pos"][mapped],
            2: got["pos"][mapped] + 1,
            3: inp[3][mapped],
            4: 0,
            5: strand[mapped],
        }
    ).reset_index(drop=True)
    pd.testing.assert_frame_equal(table, out, check_dtype=False)
    assert set(got["strand"][mapped]) == {"+", "-"}


@needs_data
def test_hg17tohg18_ten_thousand_points_and_comments():
    chains = read_chain(CHAINS / "hg17ToHg18.over.chain.gz")
    with gzip.open(CHAINS / "hg17ToHg18.over.chain.gz", "rt") as f:
        assert sum(line.startswith("##") for line in f) > 0  # comment lines are there
    ref = reference_blocks(CHAINS / "hg17ToHg18.over.chain.gz")
    blocks = chains.blocks()
    assert len(blocks) == len(ref) == 10_633
    for col in ("t_start", "q_start", "size"):
        np.testing.assert_array_equal(blocks[col].to_numpy(), ref[col].to_numpy())
    assert (blocks["q_strand"].to_numpy() == ref["strand"].to_numpy()).all()
    pts = pd.read_csv(
        CHAINS / "hg17ToHg18.testpoints.txt.gz",
        sep="\t",
        header=None,
        names=["c", "p", "c2", "p2"],
    )
    assert len(pts) == 10_000
    got = liftover_points(chains, pts["c"].to_numpy(), pts["p"].to_numpy())
    want_chrom = pts["c2"].where(pts["c2"] != "-", None)
    assert (got["chrom"].isna() == want_chrom.isna()).all()
    m = want_chrom.notna()
    assert (got["chrom"][m] == pts["c2"][m]).all()
    assert (got["pos"][m] == pts["p2"][m]).all()
    assert 0 < int((~m).sum()) < 10_000


@needs_data
def test_human_to_mouse_chrM_and_orientation_refused():
    hg38 = read_chrom_sizes(GENOMES / "hg38.chrom.sizes")
    mm10 = read_chrom_sizes(GENOMES / "mm10.chrom.sizes")
    chains = read_chain(CHAINS / "hg38.mm10.chrM.chain", hg38, mm10)
    assert (chains.n_chains, chains.n_blocks) == (1, 152)
    assert chains.t_sizes_dict() == {"chrM": 16_569} and chains.q_sizes_dict() == {"chrM": 16_299}
    ref = reference_blocks(CHAINS / "hg38.mm10.chrM.chain")
    np.testing.assert_array_equal(chains.block_t_start, ref["t_start"])
    np.testing.assert_array_equal(chains.block_q_start_forward, ref["q_start"])
    al = bin_blocks(chains, "target_human", human_sizes=hg38, mouse_sizes=mm10)
    a = al["chrM"]
    assert len(a) > 500 and a.mouse_bin.max() < 16_299 // 25 + 1
    assert a.human_bin.max() < 16_569 // 25 + 1 and np.all(np.diff(a.mouse_bin) >= 0)
    with pytest.raises(InputDataError, match=r"hg38\.mm10\.chrM\.chain.*other way round"):
        bin_blocks(
            chains,
            "target_mouse",
            human_sizes=hg38,
            mouse_sizes=mm10,
            human_assembly="hg38",
            mouse_assembly="mm10",
        )
    with pytest.raises(ConfigError, match="orientation 'mouse_first' is unknown"):
        bin_blocks(chains, "mouse_first")  # type: ignore[arg-type]


@needs_data
def test_ensembl_names_and_unknown_chromosome():
    chains = read_chain(CHAINS / "GRCh37_to_GRCh38.chain.gz")
    assert (chains.n_chains, chains.n_blocks) == (3_004, 84_109)
    # Ensembl names ('1', 'X', 'MT', patches) next to a few UCSC-style ones
    assert {"1", "X", "MT"} <= set(chains.t_names) and {"1", "X"} <= set(chains.q_names)
    assert set(chains.score) == {1.0}
    hits = liftover_points(chains, "1", [10_000, 1_000_000])
    assert hits["chrom"].tolist()[1] == "1"
    hg19 = read_chrom_sizes(GENOMES / "hg19.chrom.sizes")
    with pytest.raises(InputDataError, match=r"GRCh37_to_GRCh38.*target chromosome '1' is not in"):
        check_chrom_sizes(chains, hg19, None, target_assembly="hg19")


@needs_data
def test_real_aligned_bases_fall_in_paired_bins():
    """hg38ToHg19 with hg19 playing 'mouse': liftOver's base answers land in paired bins."""
    chains = read_chain(CHAINS / "hg38ToHg19.over.chain.gz")
    al = next(
        iter_bin_blocks(chains, "target_human", mouse_chroms=["chr21"], minus_strand="mirrored")
    )
    b = chains.blocks()
    b = b[(b.q_chrom == "chr21") & (b["size"] >= 25)]
    rng = np.random.default_rng(0)
    k = rng.integers(0, len(b), 4000)
    chrom = b["t_chrom"].astype(str).to_numpy()[k]
    pos = b["t_start"].to_numpy()[k] + (rng.random(len(k)) * b["size"].to_numpy()[k]).astype(int)
    lifted = liftover_points(chains, chrom, pos)
    ok = (lifted["n_hits"] == 1).to_numpy()
    assert ok.all() and (lifted["chrom"] == "chr21").all()

    def key(mouse_bin, human_code, human_bin):  # one int64 per pair (bins < 2**24)
        return (np.asarray(human_code, np.int64) << 48) | (human_bin << 24) | mouse_bin

    code = pd.Index(al.human_names).get_indexer(chrom)
    inside = np.isin(
        key(lifted["pos"].to_numpy() // 25, code, pos // 25),
        key(al.mouse_bin, al.human_chrom, al.human_bin),
    )
    for s in "+-":
        sel = (lifted["strand"] == s).to_numpy()
        assert sel.sum() > 20 and inside[sel].mean() > 0.5, (s, inside[sel].mean())


# ---------------------------------------------------------------------------------- liftOver
def test_liftover_duplicated_gap_minus_and_unknown(tmp_path):
    text = (
        "chain 50 t1 1000 + 0 300 q1 2000 + 100 420 1\n100 50 70\n150\n\n"
        "chain 40 t1 1000 + 250 300 q2 500 - 0 50 2\n50\n"
    )
    chains = read_chain(write(tmp_path / "l.chain", text))
    got = liftover_points(
        chains, ["t1", "t1", "t1", "t1", "t2", "t1"], [5, 120, 200, 260, 5, 5000]
    )
    assert got["chrom"].fillna("").tolist() == ["q1", "", "q1", "", "", ""]
    assert got["pos"].tolist() == [105, -1, 320, -1, -1, -1]
    assert got["n_hits"].tolist() == [1, 0, 1, 2, 0, 0]  # 260: two chains -> "Duplicated"
    only_minus = read_chain(write(tmp_path / "m.chain", text.split("\n\n")[1]))
    got = liftover_points(only_minus, "t1", [250, 299])
    # strand coordinate 0 is forward 499 on a 500 bp chromosome
    assert got["pos"].tolist() == [499, 450] and got["strand"].tolist() == ["-", "-"]


# -------------------------------------------------------------------------------- bad input
GOOD = "chain 10 t1 1000 + 0 60 q1 1000 + 0 62 7\n20 5 7\n35\n\n"


@pytest.mark.parametrize(
    "text, match",
    [
        ("chain 10 t1 1000 + 0 60 q1 1000 + 0 62 7\n20 5 7\n", r"line 2: chain ends with"),
        (GOOD + "chain 11 t1 1000 + 100 200 q1 1000 + 100 200 8\n", r"line 5: chain has no block"),
        (
            "chain 10 t1 1000 + 0 61 q1 1000 + 0 62 7\n20 5 7\n35\n",
            r"line 1: block sizes plus gaps",
        ),
        ("chain 10 t1 1000 + 0 60 q1 1000 + 0 62\n20 5 7\n35\n", None),  # id is optional
        (
            "chain 10 t1 1000 + 0 60 q1 1000 +\n20 5 7\n35\n",
            r"line 1: chain header with 10 fields",
        ),
        ("chain 10 t1 1000 + 0 60 q1 1000 + 0 6x2 7\n20 5 7\n35\n", r"line 1: header field qEnd"),
        ("chain 10 t1 1000 + 0 60 q1 1000 + 0 62 7\n20 5 -7\n35\n", r"line 2: block field 3"),
        ("chain 10 t1 1000 + 0 60 q1 1000 + 0 62 7\n20 5\n35\n", r"line 2: block line with 2"),
        ("chain 10 t1 1000 - 0 60 q1 1000 + 0 62 7\n20 5 7\n35\n", r"line 1: target strand"),
        ("chain 10 t1 1000 + 0 60 q1 1000 * 0 62 7\n20 5 7\n35\n", r"line 1: header field qStr"),
        (GOOD + "chain 9 t1 999 + 0 10 q1 1000 + 0 10 8\n10\n", r"line 5: target chromosome 't1'"),
        ("20 5 7\n" + GOOD, r"line 1: block line before any 'chain' header"),
        (GOOD + "chain 10 t1 1000 + 0 5 q1 1000 + 0 5 7\n5\n6\n", r"line 6: a chain's final"),
        ("chain 10 t1 1000 + 0 60 q1 1000 + 0 62 7\n20 5 7\n35 1 1\n3\n", r"line 1: block sizes"),
        ("# only a comment\n", r": no 'chain' header line"),
        ("hello world\n", r"line 1: unexpected line 'hello world'"),
        ("chain 10 t1 1000 + 0 1001 q1 1000 + 0 1001 7\n1001\n", r"line 1: chain span outside"),
        ("chain 1.5e3 t1 1000 + 0 60 q1 1000 + 0 62 7\n20 5 7\n35\n", None),  # float score
        ("chain x t1 1000 + 0 60 q1 1000 + 0 62 7\n20 5 7\n35\n", r"line 1: header field score"),
        ("chains 10 t1 1000 + 0 60 q1 1000 + 0 62 7\n20 5 7\n35\n", r"line 1: line starts with"),
    ],
)
def test_bad_chain_files_name_file_and_line(tmp_path, text, match):
    p = write(tmp_path / "bad.chain", text)
    if match is None:
        c = read_chain(p)
        assert c.n_blocks == 2 and c.block_t_start.tolist() == [0, 25]
        return
    with pytest.raises(InputDataError, match=rf"bad\.chain ?{match}"):
        read_chain(p)


def test_comments_blank_lines_crlf_and_gzip(tmp_path):
    text = (
        "##matrix=axtChain 16 91,-114,-31,-123\n##gapPenalties=axtChain O=400 E=30\n\n"
        + GOOD
        + "# a comment between chains\n"
        + "chain 5 t2 500 + 10 40 q1 1000 - 900 930 9\n30\n"
    )
    for i, (body, gz) in enumerate([(text, False), (text, True), (text.replace("\n", "\r\n"), 0)]):
        c = read_chain(write(tmp_path / f"c{i}.chain", body, gz=bool(gz)))
        assert c.n_chains == 2 and c.n_blocks == 3
        assert c.chain_id.tolist() == [7, 9] and c.header_line.tolist() == [4, 9]
        assert c.block_q_start.tolist() == [0, 27, 900]
        assert c.block_q_start_forward.tolist() == [0, 27, 70]
        assert c.t_names == ("t1", "t2") and c.q_strand.tolist() == [1, -1]


@needs_data
def test_chunked_reading_gives_the_same_blocks_and_line_numbers(tmp_path, monkeypatch):
    import epiray.chain as chain_module

    whole = read_chain(CHAINS / "hg17ToHg18.over.chain.gz")
    monkeypatch.setattr(chain_module, "CHUNK_BYTES", 4093)  # cuts lines and chains anywhere
    parts = read_chain(CHAINS / "hg17ToHg18.over.chain.gz")
    for field in (
        "chain_id",
        "score",
        "t_start",
        "q_start",
        "q_end",
        "header_line",
        "block_chain",
        "block_t_start",
        "block_q_start",
        "block_size",
    ):
        np.testing.assert_array_equal(getattr(parts, field), getattr(whole, field))
    assert parts.t_names == whole.t_names and parts.q_names == whole.q_names
    bad = GOOD * 3000 + "chain 10 t1 1000 + 0 60 q1 1000 + 0 62 7\n20 5 x\n35\n"
    with pytest.raises(InputDataError, match=r"line 12002: block field 3 is 'x'"):
        read_chain(write(tmp_path / "late.chain", bad))


def test_truncated_gzip_and_missing_file(tmp_path):
    p = write(tmp_path / "t.chain.gz", GOOD * 2000, gz=True)
    data = p.read_bytes()
    (tmp_path / "cut.chain.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputDataError, match=r"cut\.chain\.gz: the gzip stream is damaged"):
        read_chain(tmp_path / "cut.chain.gz")
    with pytest.raises(InputDataError, match=r"nope\.chain: file not found"):
        read_chain(tmp_path / "nope.chain")


def test_chrom_sizes_checked_and_swap_detected(tmp_path):
    p = write(tmp_path / "s.chain", GOOD)
    assert isinstance(read_chain(p, {"t1": 1000}, {"q1": 1000}), Chains)
    with pytest.raises(
        InputDataError, match=r"s\.chain: .*target chromosome 't1' has length 1000"
    ):
        read_chain(p, {"t1": 999}, None, target_assembly="hgX")
    with pytest.raises(InputDataError, match=r"query chromosome 'q1' is not in mmX"):
        read_chain(p, None, {"chr1": 1000}, query_assembly="mmX")
    text = "chain 10 h1 500 + 0 60 m1 400 + 0 62 7\n20 5 7\n35\n"
    c = read_chain(write(tmp_path / "w.chain", text))
    with pytest.raises(InputDataError, match=r"other way round \(target hg, query mm\)"):
        bin_blocks(
            c,
            "target_mouse",
            human_sizes={"h1": 500},
            mouse_sizes={"m1": 400},
            human_assembly="hg",
            mouse_assembly="mm",
        )
