import gzip

import numpy as np
import pyBigWig
import pytest

from epiray.bigwig import bigwig_chroms, bin_intervals, open_bigwig, read_binned, write_bigwig
from epiray.errors import InputDataError


def bin_base_array(per_base: np.ndarray, length: int, bin_size: int = 25) -> np.ndarray:
    """Independent reference: pad to whole bins, sum, divide by each bin's real width."""
    nb = -(-length // bin_size)
    pad = np.zeros(nb * bin_size)
    pad[:length] = per_base
    widths = np.full(nb, float(bin_size))
    widths[-1] = length - (nb - 1) * bin_size
    return pad.reshape(nb, bin_size).sum(1) / widths


def test_bin_intervals_hand_computed():
    # bases 0..9 of a 12 bp chromosome, bins of 5: [0,5) [5,10) [10,12)
    starts, ends, vals = np.array([1, 4, 9]), np.array([4, 7, 11]), np.array([2.0, 1.0, 4.0])
    got = bin_intervals(starts, ends, vals, 12, 5)
    # bin0: bases1-3 -> 2*3 + base4 -> 1 = 7/5; bin1: bases 5,6 -> 2 + base 9 -> 4 = 6/5
    # bin2: base 10 -> 4 over width 2
    np.testing.assert_allclose(got, [7 / 5, 6 / 5, 4 / 2])


def test_valid_bigwig_equals_its_bedgraph(shared_data):
    bw_path = shared_data / "bigwig/valid.bigWig"
    length = 83_257_441
    per_base = np.zeros(length)
    for line in (shared_data / "bigwig/single_chrom.bedGraph").read_text().splitlines():
        c, s, e, v = line.split()
        assert c == "chr17"
        per_base[int(s) : int(e)] = float(v)
    expected = bin_base_array(per_base, length)
    got = read_binned(bw_path, "chr17", length, 25)
    assert got.shape == (3_330_298,)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_fixedstep_bigwig_equals_its_wig(shared_data):
    length = 248_956_422
    per_base = np.zeros(length)
    pos = step = span = None
    for line in (shared_data / "bigwig/fixedStep.wig").read_text().splitlines():
        if line.startswith("fixedStep"):
            kv = dict(x.split("=") for x in line.split()[1:])
            assert kv["chrom"] == "chr1"
            pos, step, span = int(kv["start"]) - 1, int(kv["step"]), int(kv.get("span", 1))
        elif line.strip():
            per_base[pos : pos + span] = float(line)
            pos += step
    got = read_binned(shared_data / "bigwig/fixedStep.bw", "chr1", length, 25)
    # the bigWig stores float32 values
    np.testing.assert_allclose(got, bin_base_array(per_base, length), rtol=1e-5, atol=1e-6)
    assert got.max() > 0


def test_write_then_read_roundtrip(tmp_path):
    sizes = {"chrA": 1003, "chrB": 50}
    tracks = {"chrA": np.linspace(0, 4, 41), "chrB": np.array([1.5, 2.5])}
    p = write_bigwig(tmp_path / "t.bw", sizes, tracks, 25)
    assert bigwig_chroms(p) == sizes
    for c in sizes:
        np.testing.assert_allclose(read_binned(p, c, sizes[c], 25), tracks[c], rtol=1e-6)
    bw = pyBigWig.open(str(p))
    assert bw.intervals("chrA")[-1] == (1000, 1003, pytest.approx(4.0))
    assert not list(tmp_path.glob(".*tmp*"))


def test_missing_file(tmp_path):
    with pytest.raises(InputDataError, match=r"experiment E1 \(.*nope.bw\): file not found"):
        open_bigwig(tmp_path / "nope.bw", experiment="E1")


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt(tmp_path, shared_data, how):
    src = (shared_data / "bigwig/test04_hg19.bigwig").read_bytes()
    bad = tmp_path / "bad.bw"
    bad.write_bytes(src[: len(src) // 3] if how == "truncated" else gzip.compress(src)[:5000])
    with pytest.raises(InputDataError, match=r"experiment E9 \(.*bad.bw\).*corrupt or truncated"):
        read_binned(bad, "chr1", 249_250_621, 25, experiment="E9")


def test_chrom_missing_and_naming_hint(shared_data):
    p = shared_data / "bigwig/test04_hg19.noChr.bigwig"
    with pytest.raises(
        InputDataError,
        match=r"E1 .* chrom chr1: chromosome 'chr1' not found.*"
        r"chrom_names",
    ):
        read_binned(p, "chr1", 249_250_621, 25, experiment="E1")
    # the explicit option reads it under its own name
    a = read_binned(p, "chr1", 249_250_621, 25, file_chrom="1")
    b = read_binned(shared_data / "bigwig/test04_hg19.bigwig", "chr1", 249_250_621, 25)
    np.testing.assert_array_equal(a, b)


def test_length_mismatch(shared_data):
    p = shared_data / "bigwig/bigwig_chr9_4000000_6000000_K562_H3K4me3.bigwig"
    with pytest.raises(InputDataError, match=r"expected 141213431, got 138394717.*assembly"):
        read_binned(p, "chr9", 141_213_431, 25, experiment="K562.H3K4me3")
