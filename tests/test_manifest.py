import pytest

from epiray.errors import InputDataError
from epiray.manifest import manifest_hash, read_manifest
from tests.conftest import write_tsv


def row(**kw):
    base = {
        "experiment": "e1",
        "species": "mouse",
        "assembly": "mm10",
        "biosample": "B1",
        "assay": "H3K4me3",
        "category": "histone_modification",
        "path": "a.bw",
    }
    return {**base, **kw}


def test_reads_and_resolves(tmp_path):
    (tmp_path / "a.bw").write_bytes(b"")
    m = write_tsv(tmp_path / "m.tsv", [row(), row(experiment="e2", biosample="B2")])
    df = read_manifest(m)
    assert list(df["experiment"]) == ["e1", "e2"]
    assert df["path"][0] == str(tmp_path / "a.bw")
    assert (df["transform"] == "arcsinh").all()
    assert df["donor"].isna().all()
    assert list(df["row"]) == [2, 3]


def test_every_problem_at_once(tmp_path):
    (tmp_path / "a.bw").write_bytes(b"")
    m = write_tsv(
        tmp_path / "m.tsv",
        [
            row(),
            row(),  # duplicate e1
            row(experiment="e3", category="chromatin"),
            row(experiment="e4", path="missing.bw"),
            row(experiment="e5", species="human"),  # mm10 and biosample B1 used by two species
            row(experiment="e6", transform="log"),
            row(experiment="e7", path="a.txt"),
        ],
    )
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(InputDataError) as ei:
        read_manifest(m)
    msg = str(ei.value)
    assert "'e1' listed more than once (lines [2, 3])" in msg
    assert "line 4 (experiment e3): unknown category 'chromatin'" in msg
    assert "line 5 (experiment e4): file not found" in msg
    assert "assembly 'mm10' is used by more than one species" in msg
    assert "biosample 'B1' is used by more than one species" in msg
    assert "unknown transform 'log'" in msg
    assert "unknown track format '.txt'" in msg
    assert str(m) in msg


def test_missing_and_unknown_columns(tmp_path):
    m = tmp_path / "m.tsv"
    m.write_text("experiment\tspecies\tcolour\ne1\tmouse\tred\n")
    with pytest.raises(InputDataError, match=r"missing column\(s\).*assembly") as ei:
        read_manifest(m)
    assert "unknown column(s) ['colour']" in str(ei.value)


def test_hash_ignores_order_and_paths(tmp_path):
    (tmp_path / "a.bw").write_bytes(b"")
    a = read_manifest(write_tsv(tmp_path / "a.tsv", [row(), row(experiment="e2")]))
    b = read_manifest(write_tsv(tmp_path / "b.tsv", [row(experiment="e2"), row()]))
    assert manifest_hash(a) == manifest_hash(b)
    c = read_manifest(write_tsv(tmp_path / "c.tsv", [row(), row(experiment="e2", assay="X")]))
    assert manifest_hash(a) != manifest_hash(c)
