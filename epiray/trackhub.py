"""A UCSC-style track hub over imputed bigWigs: load every imputed track with one URL.

:func:`write_trackhub` reads the sidecars of an imputation output folder (see
:mod:`epiray.impute`) and writes::

    HUB/hub.txt                          hub name, labels, email, genomesFile
    HUB/genomes.txt                      one stanza per assembly
    HUB/{assembly}/trackDb.txt           one composite track per assembly and scale
    HUB/{assembly}/{assembly}.chrom.sizes
    HUB/{assembly}/{assembly}.2bit       assembly hubs only, see below

``HUB`` defaults to the output folder itself. ``bigDataUrl`` entries are paths relative to the
``trackDb.txt`` that names them (``../B1.H3K4me3.arcsinh.bw``), so the folder can be served by
any web server (or copied as a whole) and loaded in the UCSC Genome Browser (*My Data → Track
Hubs → URL of hub.txt*) or IGV (*File → Load from URL*).

Tracks: one composite track per (assembly, scale), with subgroups ``assay``, ``biosample``,
``category`` and ``scale``; the UCSC track settings page shows the assay × biosample matrix and
filters by category. Each subtrack is coloured by the activity category of its assay
(:data:`CATEGORY_COLORS`).

UCSC databases vs. assembly hubs: an assembly that is a UCSC database (``hg38``, ``mm10`` ...)
needs only ``genome`` and ``trackDb``. Any other assembly (e.g. the synthetic ``hsSyn1`` and
``mmSyn1``) must be an *assembly hub*: the genome browser needs the sequence as ``twoBitPath``.
Pass the assembly's ``.2bit`` when you have it; otherwise a placeholder ``.2bit`` of ``N`` bases
with the right chromosome sizes is written (signal tracks display normally; the sequence track
shows N). ``chromSizes`` always points to the written ``{assembly}.chrom.sizes``, which lets
browsers lay out chromosomes without reading the 2bit.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from epiray import __version__
from epiray.errors import EpirayError, InputDataError
from epiray.store import atomic_write_bytes, atomic_write_text

__all__ = [
    "CATEGORY_COLORS",
    "check_trackhub",
    "is_ucsc_database",
    "read_stanzas",
    "track_name",
    "write_placeholder_twobit",
    "write_trackhub",
]

#: Colour (r, g, b) of each activity category.
CATEGORY_COLORS: dict[str, tuple[int, int, int]] = {
    "histone_modification": (31, 119, 180),  # blue
    "protein_binding": (214, 39, 40),  # red
    "transcription": (44, 160, 44),  # green
    "accessibility": (255, 127, 14),  # orange
    "other": (127, 127, 127),  # grey
}
SHORT_LABEL_MAX = 17
LONG_LABEL_MAX = 80
TRACK_NAME_MAX = 128
_TRACK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_UCSC_DB = re.compile(
    r"^(hg|mm|rn|danRer|dm|ce|sacCer|galGal|susScr|bosTau|canFam|panTro|panPan|gorGor|ponAbe|"
    r"rheMac|macFas|calJac|oryCun|equCab|felCat|oviAri|monDom|xenTro|taeGut|fr|tetNig|"
    r"gasAcu|oryLat|petMar|ci|strPur|apiMel|anoGam|droSim|droYak|caePb|cb|caeRem)\d+$"
)
_LABEL_BAD = re.compile(r"[\s=]+")
TWOBIT_SIGNATURE = 0x1A412743


def is_ucsc_database(assembly: str) -> bool:
    """True for names of UCSC genome databases (``hg38``, ``mm10``, ``danRer11`` ...)."""
    return bool(_UCSC_DB.match(assembly))


def _sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    return s or "x"


def track_name(*parts: str) -> str:
    """A UCSC track name from ``parts``: letters, digits and ``_``, starting with a letter."""
    s = "_".join(_sanitize(p) for p in parts)
    if not s[0].isalpha():
        s = "t" + s
    return s[:TRACK_NAME_MAX]


def _short_label(biosample: str, assay: str) -> str:
    label = f"{biosample} {assay}"
    if len(label) <= SHORT_LABEL_MAX:
        return label
    a = assay[:9]
    return f"{biosample[: SHORT_LABEL_MAX - len(a) - 1]} {a}"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _stanza(settings: list[tuple[str, Any]], indent: str = "") -> str:
    return "".join(f"{indent}{k} {v}\n" for k, v in settings if v is not None) + "\n"


def write_placeholder_twobit(path: str | Path, chrom_sizes: Mapping[str, int]) -> Path:
    """Write a ``.2bit`` whose every base is ``N`` (one N block per sequence), atomically.

    For assembly hubs of genomes without a sequence (synthetic assemblies): the browser needs a
    2bit to define the assembly, and the tracks display normally over it.

    Parameters
    ----------
    path
        Output file.
    chrom_sizes
        Sequence name -> length in bases.

    Raises
    ------
    InputDataError
        A name longer than 255 bytes, or a genome too large for the 32-bit 2bit format (4 GiB).
    """
    path = Path(path)
    names = [c.encode() for c in chrom_sizes]
    if any(len(n) > 255 for n in names):
        raise InputDataError(
            f"2bit {path}: a chromosome name is longer than 255 bytes; expected shorter names."
        )
    index_size = sum(1 + len(n) + 4 for n in names)
    offset = 16 + index_size
    header = [struct.pack("<IIII", TWOBIT_SIGNATURE, 0, len(names), 0)]
    records = []
    for name, size in zip(names, chrom_sizes.values()):
        size = int(size)
        header.append(struct.pack("<B", len(name)) + name + struct.pack("<I", offset))
        # dnaSize, nBlockCount, nBlockStarts, nBlockSizes, maskBlockCount, reserved, packed DNA
        rec = struct.pack("<IIIIII", size, 1, 0, size, 0, 0) + bytes((size + 3) // 4)
        records.append(rec)
        offset += len(rec)
        if offset >= 2**32:
            raise InputDataError(
                f"2bit {path}: the genome is too large for a placeholder 2bit (over 4 GiB); "
                "expected a smaller genome. Pass the assembly's own .2bit (twobit=...)."
            )
    atomic_write_bytes(path, b"".join(header) + b"".join(records))
    return path


def _read_sidecars(outputs: Path) -> list[dict[str, Any]]:
    from epiray.impute import read_outputs

    return read_outputs(outputs)


def write_trackhub(
    outputs: str | Path,
    hub_dir: str | Path | None = None,
    *,
    hub_name: str = "epiray_imputed",
    short_label: str = "epiray imputed",
    long_label: str | None = None,
    email: str = "none@example.com",
    twobit: Mapping[str, str | Path] | None = None,
    assembly_hub: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a track hub over the imputed bigWigs of an output folder.

    Parameters
    ----------
    outputs
        An impute ``output_dir`` (bigWigs with their ``.json`` sidecars).
    hub_dir
        Where the hub files go (default ``outputs``). The bigWigs stay where they are and are
        referenced by relative paths, so serve a folder containing both.
    hub_name, short_label, long_label, email
        ``hub.txt`` settings (``hub_name`` becomes a valid name: letters, digits, ``_``).
    twobit
        Assembly -> its ``.2bit`` file, referenced relatively (serve it with the hub).
    assembly_hub
        Write assembly-hub stanzas (``twoBitPath``, ``chromSizes`` ...): ``None`` decides per
        assembly (every non-UCSC database name); ``True``/``False`` forces it.
    overwrite
        Replace an existing hub (``hub.txt`` present in ``hub_dir``).

    Returns
    -------
    pathlib.Path
        The ``hub.txt`` to load in a genome browser.

    Raises
    ------
    EpirayError
        No imputed tracks in ``outputs``, or a hub already exists and ``overwrite`` is false.
    """
    outputs = Path(outputs)
    hub = Path(hub_dir) if hub_dir is not None else outputs
    tracks = _read_sidecars(outputs)
    if not tracks:
        raise EpirayError(
            f"track hub {outputs}: no imputed tracks; expected bigWigs with epiray sidecars. "
            "Run `epiray impute` first or point at its output_dir."
        )
    hub_txt = hub / "hub.txt"
    if hub_txt.exists() and not overwrite:
        raise EpirayError(
            f"track hub {hub_txt}: already exists; expected a folder without a hub. Pass "
            "overwrite=True (--overwrite) to rewrite it."
        )
    hub.mkdir(parents=True, exist_ok=True)
    by_asm: dict[str, list[dict[str, Any]]] = {}
    for t in tracks:
        by_asm.setdefault(t["assembly"], []).append(t)

    models = sorted({t["model"] for t in tracks})
    long_label = long_label or _clip(
        f"Imputed epigenomic tracks ({len(tracks)} tracks, epiray {__version__}, model "
        f"{', '.join(models)})",
        LONG_LABEL_MAX,
    )
    atomic_write_text(
        hub_txt,
        _stanza(
            [
                ("hub", track_name(hub_name)),
                ("shortLabel", _clip(short_label, SHORT_LABEL_MAX)),
                ("longLabel", _clip(long_label, LONG_LABEL_MAX)),
                ("genomesFile", "genomes.txt"),
                ("email", email),
            ]
        ),
    )
    genomes = []
    for order, (asm, ts) in enumerate(sorted(by_asm.items()), start=1):
        gdir = hub / asm
        gdir.mkdir(parents=True, exist_ok=True)
        sizes = {c: int(n) for c, n in ts[0]["chrom_sizes"]}
        sizes_file = gdir / f"{asm}.chrom.sizes"
        atomic_write_text(sizes_file, "".join(f"{c}\t{n}\n" for c, n in sizes.items()))
        settings: list[tuple[str, Any]] = [("genome", asm), ("trackDb", f"{asm}/trackDb.txt")]
        as_hub = (not is_ucsc_database(asm)) if assembly_hub is None else assembly_hub
        if as_hub:
            if twobit and asm in twobit:
                tb = Path(twobit[asm])
                if not tb.is_file():
                    raise InputDataError(
                        f"track hub {hub_txt}: 2bit for {asm} not found ({tb}); expected an "
                        "existing .2bit file. Fix the path."
                    )
                tb_rel = os.path.relpath(tb.resolve(), hub.resolve())
            else:
                tb_rel = f"{asm}/{asm}.2bit"
                write_placeholder_twobit(hub / tb_rel, sizes)
            first = next(iter(sizes))
            species = ts[0].get("species") or asm
            settings += [
                ("twoBitPath", tb_rel),
                ("chromSizes", f"{asm}/{asm}.chrom.sizes"),
                ("organism", species),
                ("scientificName", species),
                ("description", f"{asm} ({species}), imputed by epiray"),
                ("defaultPos", f"{first}:1-{min(sizes[first], 100_000)}"),
                ("orderKey", order),
            ]
        genomes.append(_stanza(settings))
        atomic_write_text(gdir / "trackDb.txt", _trackdb(asm, ts, gdir, outputs))
    atomic_write_text(hub / "genomes.txt", "".join(genomes))
    return hub_txt


def _trackdb(asm: str, tracks: list[dict[str, Any]], gdir: Path, outputs: Path) -> str:
    """The trackDb of one assembly: one composite per scale, one subtrack per bigWig."""
    text = []
    used: set[str] = set()
    for scale in sorted({t["scale"] for t in tracks}):
        ts = sorted(
            (t for t in tracks if t["scale"] == scale), key=lambda t: (t["assay"], t["biosample"])
        )
        comp = track_name("epiray", asm, scale)
        used.add(comp)
        tags: dict[str, dict[str, str]] = {"assay": {}, "biosample": {}, "category": {}}
        for t in ts:
            for kind in tags:
                tags[kind].setdefault(t[kind], "")
        for m in tags.values():
            seen: set[str] = set()
            for name in sorted(m):
                tag, k = _sanitize(name), 2
                while tag in seen:
                    tag, k = f"{_sanitize(name)}_{k}", k + 1
                seen.add(tag)
                m[name] = tag

        def group(m: dict[str, str]) -> str:
            # labels show "_" as a space; they must not hold spaces or "="
            return " ".join(f"{tag}={_LABEL_BAD.sub('_', name)}" for name, tag in m.items())

        models = sorted({t["model"] for t in ts})
        text.append(
            _stanza(
                [
                    ("track", comp),
                    ("compositeTrack", "on"),
                    ("shortLabel", _clip(f"Imputed {scale}", SHORT_LABEL_MAX)),
                    (
                        "longLabel",
                        _clip(
                            f"epiray imputed tracks on {asm}, {scale} scale (model "
                            f"{', '.join(models)})",
                            LONG_LABEL_MAX,
                        ),
                    ),
                    ("type", "bigWig"),
                    ("subGroup1", f"assay Assay {group(tags['assay'])}"),
                    ("subGroup2", f"biosample Biosample {group(tags['biosample'])}"),
                    ("subGroup3", f"category Category {group(tags['category'])}"),
                    ("subGroup4", f"scale Scale {_sanitize(scale)}={_sanitize(scale)}"),
                    ("dimensions", "dimX=assay dimY=biosample dimA=category"),
                    ("filterComposite", "dimA"),
                    ("sortOrder", "assay=+ biosample=+ category=+"),
                    ("dragAndDrop", "subTracks"),
                    ("visibility", "dense"),
                    ("autoScale", "on"),
                    ("windowingFunction", "mean"),
                    ("maxHeightPixels", "100:32:8"),
                ]
            )
        )
        for t in ts:
            name, k = track_name(t["biosample"], t["assay"], scale), 2
            while name in used:
                name, k = track_name(t["biosample"], t["assay"], scale, str(k)), k + 1
            used.add(name)
            cat = t.get("category") or "other"
            color = ",".join(map(str, CATEGORY_COLORS.get(cat, CATEGORY_COLORS["other"])))
            flags = " (zero-shot assay)" if t.get("zero_shot") else ""
            sub = (
                f"assay={tags['assay'][t['assay']]} biosample={tags['biosample'][t['biosample']]}"
                f" category={tags['category'][t['category']]} scale={_sanitize(scale)}"
            )
            rel = os.path.relpath(Path(t["path"]).resolve(), gdir.resolve())
            text.append(
                _stanza(
                    [
                        ("track", name),
                        ("parent", f"{comp} on"),
                        ("subGroups", sub),
                        ("shortLabel", _short_label(t["biosample"], t["assay"])),
                        (
                            "longLabel",
                            _clip(
                                f"Imputed {t['assay']} in {t['biosample']} ({asm}, {scale})"
                                f"{flags}",
                                LONG_LABEL_MAX,
                            ),
                        ),
                        ("type", "bigWig"),
                        ("bigDataUrl", Path(rel).as_posix()),
                        ("color", color),
                    ],
                    indent="    ",
                )
            )
    return "".join(text)


# ------------------------------------------------------------------------------------ checking
def read_stanzas(path: str | Path) -> list[dict[str, str]]:
    """Parse a UCSC ``.ra``-style file (hub.txt, genomes.txt, trackDb.txt) into stanzas.

    Stanzas are separated by blank lines; each line is ``key value``; ``#`` lines are comments;
    leading whitespace is ignored.
    """
    stanzas: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        s = line.strip()
        if not s:
            if cur:
                stanzas.append(cur)
                cur = {}
            continue
        if s.startswith("#"):
            continue
        key, _, value = s.partition(" ")
        cur[key] = value.strip()
    if cur:
        stanzas.append(cur)
    return stanzas


_REQUIRED = {
    "hub": ("hub", "shortLabel", "longLabel", "genomesFile", "email"),
    "genome": ("genome", "trackDb"),
    "assembly": ("twoBitPath",),
    "track": ("track", "shortLabel", "longLabel", "type"),
    "subtrack": ("parent", "bigDataUrl", "subGroups", "color"),
}


def check_trackhub(hub_txt: str | Path, *, ucsc_databases: Collection[str] = ()) -> list[str]:
    """Structural problems of a track hub (an empty list for a valid hub).

    Checks required keys of every stanza, that referenced files exist (genomes file, trackDb,
    twoBitPath, chromSizes, every ``bigDataUrl`` relative to its trackDb), unique track names
    following UCSC naming rules (letters, digits, ``_``, starting with a letter), label lengths
    (shortLabel ≤ 17, longLabel ≤ 80), that parents exist and that ``subGroups`` use declared
    subgroup tags.

    Parameters
    ----------
    hub_txt
        The hub's ``hub.txt``.
    ucsc_databases
        Assembly names to accept without ``twoBitPath`` in addition to
        :func:`is_ucsc_database`.
    """
    hub_txt = Path(hub_txt)
    problems: list[str] = []
    if not hub_txt.is_file():
        return [f"{hub_txt}: not found"]
    hubs = read_stanzas(hub_txt)
    if len(hubs) != 1:
        return [f"{hub_txt}: expected one stanza, got {len(hubs)}"]
    h = hubs[0]
    problems += [f"{hub_txt}: missing {k}" for k in _REQUIRED["hub"] if k not in h]
    problems += _labels(hub_txt, h)
    if "hub" in h and not _TRACK_NAME.match(h["hub"]):
        problems.append(f"{hub_txt}: hub name {h['hub']!r} is not letters/digits/_")
    gfile = hub_txt.parent / h.get("genomesFile", "genomes.txt")
    if not gfile.is_file():
        return problems + [f"{gfile}: genomesFile not found"]
    for g in read_stanzas(gfile):
        problems += [
            f"{gfile}: stanza {g}: missing {k}" for k in _REQUIRED["genome"] if k not in g
        ]
        asm = g.get("genome", "?")
        if not (is_ucsc_database(asm) or asm in ucsc_databases):
            problems += [
                f"{gfile}: genome {asm}: not a UCSC database, so it needs {k}"
                for k in _REQUIRED["assembly"]
                if k not in g
            ]
        for k in ("twoBitPath", "chromSizes", "trackDb"):
            if k in g and not (gfile.parent / g[k]).is_file():
                problems.append(f"{gfile}: genome {asm}: {k} {g[k]} not found")
        if "twoBitPath" in g and (gfile.parent / g["twoBitPath"]).is_file():
            with open(gfile.parent / g["twoBitPath"], "rb") as f:
                if struct.unpack("<I", f.read(4))[0] != TWOBIT_SIGNATURE:
                    problems.append(f"{gfile}: genome {asm}: {g['twoBitPath']} is not a 2bit")
        tdb = gfile.parent / g.get("trackDb", "")
        if tdb.is_file():
            problems += _check_trackdb(tdb)
    return problems


def _labels(where: Path, st: dict[str, str]) -> list[str]:
    out = []
    name = st.get("track") or st.get("hub") or "?"
    if len(st.get("shortLabel", "")) > SHORT_LABEL_MAX:
        out.append(f"{where}: {name}: shortLabel longer than {SHORT_LABEL_MAX} characters")
    if len(st.get("longLabel", "")) > LONG_LABEL_MAX:
        out.append(f"{where}: {name}: longLabel longer than {LONG_LABEL_MAX} characters")
    return out


def _check_trackdb(tdb: Path) -> list[str]:
    problems: list[str] = []
    stanzas = read_stanzas(tdb)
    names = [s.get("track", "") for s in stanzas]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        problems.append(f"{tdb}: duplicate track names {dup}")
    groups: dict[str, dict[str, set[str]]] = {}
    for s in stanzas:
        name = s.get("track", "?")
        problems += [f"{tdb}: track {name}: missing {k}" for k in _REQUIRED["track"] if k not in s]
        problems += _labels(tdb, s)
        if not _TRACK_NAME.match(name) or len(name) > TRACK_NAME_MAX:
            problems.append(f"{tdb}: track name {name!r} breaks UCSC naming rules")
        if s.get("compositeTrack") == "on":
            groups[name] = {}
            for k, v in s.items():
                if k.startswith("subGroup") and k[8:].isdigit():
                    parts = v.split()
                    groups[name][parts[0]] = {p.split("=", 1)[0] for p in parts[2:]}
    for s in stanzas:
        name = s.get("track", "?")
        if "parent" not in s:
            continue
        problems += [
            f"{tdb}: track {name}: missing {k}" for k in _REQUIRED["subtrack"] if k not in s
        ]
        parent = s["parent"].split()[0]
        if parent not in groups:
            problems.append(f"{tdb}: track {name}: parent {parent} is not a composite track")
            continue
        url = s.get("bigDataUrl", "")
        if "://" not in url and not (tdb.parent / url).is_file():
            problems.append(f"{tdb}: track {name}: bigDataUrl {url} not found")
        declared = groups[parent]
        for kv in s.get("subGroups", "").split():
            g, _, tag = kv.partition("=")
            if g not in declared or tag not in declared[g]:
                problems.append(f"{tdb}: track {name}: subGroups {kv} not declared by {parent}")
        if set(declared) - {kv.partition("=")[0] for kv in s.get("subGroups", "").split()}:
            problems.append(f"{tdb}: track {name}: subGroups does not set every subgroup")
        color = s.get("color", "")
        if not re.match(r"^\d{1,3},\d{1,3},\d{1,3}$", color):
            problems.append(f"{tdb}: track {name}: color {color!r} is not r,g,b")
    return problems
