"""Track hubs over imputed bigWigs: structure, UCSC naming rules, relative URLs, 2bit."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from epiray.errors import EpirayError
from epiray.impute import ImputeConfig, impute
from epiray.trackhub import (
    CATEGORY_COLORS,
    check_trackhub,
    is_ucsc_database,
    read_stanzas,
    track_name,
    write_placeholder_twobit,
    write_trackhub,
)
from tests.test_impute import MOUSE, make_store, wave_for

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@pytest.fixture
def outputs(tmp_path) -> Path:
    """Imputed bigWigs (arcsinh and signal) of every unobserved pair, zero-shot included."""
    store = make_store(tmp_path / "store")
    out = tmp_path / "out"
    for scale in ("arcsinh", "signal"):
        cfg = ImputeConfig(
            store=str(store.root),
            output_dir=str(out),
            model="models/run1",
            assembly="mmToy1",
            zero_shot_assays=True,
            scale=scale,
            executor="local",
        )
        impute(cfg, wave_for)
    return out


def read_twobit(path: Path) -> dict[str, tuple[int, list[tuple[int, int]], bytes]]:
    """Independent reader of the 2bit format: name -> (size, N blocks, packed DNA)."""
    data = path.read_bytes()
    sig, version, count, _ = struct.unpack_from("<IIII", data, 0)
    assert sig == 0x1A412743 and version == 0
    pos, index = 16, []
    for _ in range(count):
        n = data[pos]
        name = data[pos + 1 : pos + 1 + n].decode()
        (off,) = struct.unpack_from("<I", data, pos + 1 + n)
        index.append((name, off))
        pos += 1 + n + 4
    out = {}
    for name, off in index:
        size, nb = struct.unpack_from("<II", data, off)
        starts = struct.unpack_from(f"<{nb}I", data, off + 8)
        sizes = struct.unpack_from(f"<{nb}I", data, off + 8 + 4 * nb)
        p = off + 8 + 8 * nb
        (mb,) = struct.unpack_from("<I", data, p)
        p += 4 + 8 * mb + 4  # mask blocks, reserved
        out[name] = (size, list(zip(starts, sizes)), data[p : p + (size + 3) // 4])
    return out


def test_hub_structure_and_ucsc_rules(outputs):
    hub = write_trackhub(outputs)
    assert hub == outputs / "hub.txt"
    assert check_trackhub(hub) == []

    (h,) = read_stanzas(hub)
    assert set(h) >= {"hub", "shortLabel", "longLabel", "genomesFile", "email"}
    assert len(h["shortLabel"]) <= 17 and len(h["longLabel"]) <= 80
    (g,) = read_stanzas(outputs / h["genomesFile"])
    assert g["genome"] == "mmToy1" and g["trackDb"] == "mmToy1/trackDb.txt"
    # not a UCSC database: an assembly hub with the chrom sizes and a 2bit
    sizes_file = outputs / g["chromSizes"]
    assert sizes_file.read_text() == "".join(f"{c}\t{n}\n" for c, n in MOUSE.items())
    seqs = read_twobit(outputs / g["twoBitPath"])
    assert {c: s for c, (s, _, _) in seqs.items()} == MOUSE
    for size, nblocks, packed in seqs.values():
        assert nblocks == [(0, size)] and len(packed) == (size + 3) // 4

    stanzas = read_stanzas(outputs / g["trackDb"])
    names = [s["track"] for s in stanzas]
    assert len(names) == len(set(names))
    assert all(NAME.match(n) for n in names)
    composites = [s for s in stanzas if s.get("compositeTrack") == "on"]
    subs = [s for s in stanzas if "parent" in s]
    assert len(composites) == 2  # one per scale
    assert len(subs) == len(list(outputs.glob("*.bw"))) == 16
    for s in stanzas:
        assert {"track", "shortLabel", "longLabel", "type"} <= set(s)
        assert len(s["shortLabel"]) <= 17 and len(s["longLabel"]) <= 80
    for c in composites:
        groups = {v.split()[0] for k, v in c.items() if k.startswith("subGroup")}
        assert groups == {"assay", "biosample", "category", "scale"}
        assert c["type"] == "bigWig" and "dimX=assay" in c["dimensions"]
    for s in subs:
        url = s["bigDataUrl"]
        assert not url.startswith("/") and "://" not in url
        bw = (outputs / "mmToy1" / url).resolve()
        assert bw.is_file() and bw.parent == outputs.resolve()
        sg = dict(kv.split("=") for kv in s["subGroups"].split())
        cat = sg["category"]
        assert s["color"] == ",".join(map(str, CATEGORY_COLORS[cat]))
        biosample, assay, scale = bw.name.removesuffix(".bw").rsplit(".", 2)
        assert sg["assay"] == assay and sg["scale"] == scale
        assert s["parent"] == f"epiray_mmToy1_{scale} on"
    colors = {s["subGroups"].split("category=")[1].split()[0]: s["color"] for s in subs}
    assert colors == {
        "histone_modification": "31,119,180",
        "protein_binding": "214,39,40",
        "accessibility": "255,127,14",
    }
    gata = [s for s in subs if "GATA1" in s["track"]]
    assert gata and all("zero-shot" in s["longLabel"] for s in gata)


def test_existing_hub_needs_overwrite_and_checker_finds_problems(outputs):
    hub = write_trackhub(outputs)
    with pytest.raises(EpirayError, match="hub.txt: already exists.*overwrite"):
        write_trackhub(outputs)
    assert write_trackhub(outputs, overwrite=True) == hub

    next(outputs.glob("mm.B1.CTCF.arcsinh.bw")).unlink()
    tdb = outputs / "mmToy1" / "trackDb.txt"
    text = tdb.read_text().replace("track mm_B3_CTCF_signal", "track 3bad-name", 1)
    text = text.replace("shortLabel mm.B2 GATA1", "shortLabel a label of 18 chars", 1)
    tdb.write_text(text)
    problems = check_trackhub(hub)
    assert any("bigDataUrl ../mm.B1.CTCF.arcsinh.bw not found" in p for p in problems)
    assert any("'3bad-name' breaks UCSC naming rules" in p for p in problems)
    assert any("shortLabel longer than 17" in p for p in problems)
    (outputs / "mmToy1" / "mmToy1.2bit").unlink()
    assert any("twoBitPath mmToy1/mmToy1.2bit not found" in p for p in check_trackhub(hub))


def test_hub_elsewhere_uses_relative_urls(outputs, tmp_path):
    hub = write_trackhub(outputs, tmp_path / "site" / "hub", hub_name="my hub!")
    assert read_stanzas(hub)[0]["hub"] == "my_hub"
    assert check_trackhub(hub) == []
    stanzas = read_stanzas(hub.parent / "mmToy1" / "trackDb.txt")
    urls = [s["bigDataUrl"] for s in stanzas if "parent" in s]
    assert len(urls) == 16 and all(u.startswith("../../../out/") for u in urls)


def test_ucsc_database_gets_a_plain_track_hub(outputs, tmp_path):
    # the same tracks declared on a UCSC database need neither a 2bit nor chrom sizes
    hub = write_trackhub(outputs, assembly_hub=False)
    (g,) = read_stanzas(hub.parent / "genomes.txt")
    assert set(g) == {"genome", "trackDb"}
    assert any("needs twoBitPath" in p for p in check_trackhub(hub))
    assert check_trackhub(hub, ucsc_databases={"mmToy1"}) == []
    assert is_ucsc_database("hg38") and is_ucsc_database("mm10") and is_ucsc_database("danRer11")
    assert not is_ucsc_database("mmSyn1") and not is_ucsc_database("GRCh38")


def test_given_twobit_is_referenced(outputs, tmp_path):
    tb = write_placeholder_twobit(tmp_path / "ref" / "mmToy1.2bit", MOUSE)
    hub = write_trackhub(outputs, twobit={"mmToy1": tb})
    (g,) = read_stanzas(hub.parent / "genomes.txt")
    assert (hub.parent / g["twoBitPath"]).resolve() == tb.resolve()
    assert not (outputs / "mmToy1" / "mmToy1.2bit").exists()
    with pytest.raises(EpirayError, match="2bit for mmToy1 not found"):
        write_trackhub(outputs, twobit={"mmToy1": tmp_path / "nope.2bit"}, overwrite=True)


def test_names_and_labels_follow_ucsc_rules():
    assert track_name("mm.B1", "H3K4me3", "arcsinh") == "mm_B1_H3K4me3_arcsinh"
    assert track_name("1st-sample", "CTCF") == "t1st_sample_CTCF"
    assert NAME.match(track_name("ENCBS123 liver (adult, 54 y)", "H3K27ac"))
    from epiray.trackhub import _short_label

    label = _short_label("ENCBS123ABC.liver_adult_female", "H3K27me3")
    assert len(label) <= 17 and label.endswith("H3K27me3")


def test_colliding_names_are_made_unique(tmp_path):
    """Biosamples 'a.b' and 'a_b' sanitise to the same name and subgroup tag."""
    import json

    from epiray.store import Store

    store = make_store(tmp_path / "store")
    s = store.summary["experiments"]
    s["mm.B1.H3K4me3"]["biosample"] = "x.y"
    s["mm.B2.H3K4me3"]["biosample"] = "x_y"
    s["mm.B2.CTCF"]["biosample"] = "x_y"
    Store.save_summary(store)
    out = tmp_path / "out"
    cfg = ImputeConfig(
        store=str(store.root),
        output_dir=str(out),
        model="m",
        assembly="mmToy1",
        executor="local",
    )
    impute(cfg, wave_for)
    hub = write_trackhub(out)
    assert check_trackhub(hub) == []
    stanzas = read_stanzas(out / "mmToy1" / "trackDb.txt")
    names = [st["track"] for st in stanzas]
    assert "x_y_DNase_arcsinh" in names and "x_y_DNase_arcsinh_2" in names
    biosample_group = stanzas[0]["subGroup2"].split()[2:]
    assert sorted(t.split("=")[0] for t in biosample_group) == ["mm_B3", "x_y", "x_y_2"]
    assert json.loads((out / "x.y.DNase.arcsinh.json").read_text())["biosample"] == "x.y"


def test_no_outputs_is_an_error(tmp_path):
    with pytest.raises(EpirayError, match="no imputed tracks"):
        write_trackhub(tmp_path)
