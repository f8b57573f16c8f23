import pytest

from epiray.errors import InputDataError
from epiray.genome import Assembly, n_bins, read_chrom_sizes, ucsc_to_ensembl


def test_n_bins_is_ceil():
    assert n_bins(25) == 1
    assert n_bins(26) == 2
    assert n_bins(195_471_971) == 7_818_879
    assert n_bins(1000, 100) == 10


def test_read_chrom_sizes_real(shared_data):
    mm10 = read_chrom_sizes(shared_data / "genomes/mm10.chrom.sizes")
    assert mm10["chr1"] == 195_471_971
    assert mm10["chr19"] == 61_431_566


@pytest.mark.parametrize(
    "text, match",
    [("chr1\tabc\n", "malformed"), ("chr1\t10\nchr1\t10\n", "listed twice"), ("", "no chrom")],
)
def test_read_chrom_sizes_bad(tmp_path, text, match):
    p = tmp_path / "x.chrom.sizes"
    p.write_text(text)
    with pytest.raises(InputDataError, match=match):
        read_chrom_sizes(p)


def test_missing_sizes_file(tmp_path):
    with pytest.raises(InputDataError, match="not found"):
        read_chrom_sizes(tmp_path / "nope.sizes")


def test_select():
    a = Assembly(
        "t",
        "mouse",
        {"chr10": 5, "chr2": 5, "chrX": 5, "chrUn_x": 5, "chr1": 5, "chrM": 5, "chrY": 5},
    )
    assert a.select("primary") == ["chr1", "chr2", "chr10", "chrX", "chrY"]
    assert a.select("autosomes+X") == ["chr1", "chr2", "chr10", "chrX"]
    assert a.select(["chr2", "chr1"]) == ["chr2", "chr1"]
    assert len(a.select("all")) == 7
    with pytest.raises(InputDataError, match="chr99"):
        a.select(["chr99"])
    with pytest.raises(InputDataError, match="unknown chromosome selection"):
        a.select("everything")
    with pytest.raises(InputDataError, match="assembly t: chromosome 'chr3' not found"):
        a.length("chr3")


def test_ucsc_to_ensembl():
    assert ucsc_to_ensembl("chr1") == "1"
    assert ucsc_to_ensembl("chrM") == "MT"
    assert ucsc_to_ensembl("1") == "1"
