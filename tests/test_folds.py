"""Fold builders: invariants, determinism, the PREDICTD split, saving and loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from epiray import folds as F
from epiray.errors import ConfigError, EpirayWarning, InputDataError

DATA = Path(__file__).resolve().parents[2] / "shared/data"
SPLITS = DATA / "roadmap/predictd_splits.json"

CATEGORY = {
    "H3K4me3": "histone_modification",
    "H3K27ac": "histone_modification",
    "H3K9me3": "histone_modification",
    "DNase": "accessibility",
    "RNA": "transcription",
    "CTCF": "protein_binding",
    "POLR2A": "protein_binding",
    "RAD21": "protein_binding",
    "EP300": "protein_binding",
    "MYC": "protein_binding",
    "MAX": "protein_binding",
    "ZNF143": "protein_binding",
}
MOUSE = {  # experiments per assay in mouse
    "H3K4me3": 7,
    "H3K27ac": 5,
    "H3K9me3": 3,
    "DNase": 4,
    "RNA": 1,
    "CTCF": 6,
    "POLR2A": 3,
    "RAD21": 2,
    "EP300": 1,
    "MYC": 4,
    "MAX": 2,
}
HUMAN = {a: 3 for a in CATEGORY}  # ZNF143 only in human


def make_table(seed: int = 0) -> pd.DataFrame:
    rows = []
    for species, assembly, counts in (("mouse", "mm10", MOUSE), ("human", "hg38", HUMAN)):
        for assay, n in counts.items():
            for i in range(n):
                bios = f"{species[0]}{i:02d}"
                rows.append(
                    {
                        "experiment": f"{bios}.{assay}",
                        "species": species,
                        "assembly": assembly,
                        "biosample": bios,
                        "assay": assay,
                        "category": CATEGORY[assay],
                    }
                )
    df = pd.DataFrame(rows)
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # row order is noise


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return make_table()


def _ids(table: pd.DataFrame, **where) -> set[str]:
    m = np.ones(len(table), dtype=bool)
    for col, val in where.items():
        m &= table[col].isin(val if isinstance(val, (list, set)) else [val]).to_numpy()
    return set(table.loc[m, "experiment"])


def _check_partition(folds: F.Folds, table: pd.DataFrame) -> None:
    everything = set(table["experiment"])
    for f in folds:
        roles = [set(getattr(f, r)) for r in F.ROLES]
        assert sum(len(r) for r in roles) == len(everything), f.name  # disjoint
        assert set().union(*roles) == everything, f.name  # complete
    folds.check(table)


def test_experiment_folds_invariants(table: pd.DataFrame):
    folds = F.experiment_folds(table, 3, target_species="mouse", seed=1)
    assert folds.kind == "experiment_cv" and folds.names == ["fold0", "fold1", "fold2"]
    _check_partition(folds, table)
    mouse, human = _ids(table, species="mouse"), _ids(table, species="human")
    held = [set(f.held_out) for f in folds]
    assert set().union(*held) == mouse  # every mouse experiment held out once
    assert sum(len(h) for h in held) == len(mouse)
    for f in folds:
        assert human <= set(f.train)  # other species always train
        assert not set(f.validate)
    by_exp = table.set_index("experiment")["assay"]
    for assay, n in MOUSE.items():
        per_fold = [sum(by_exp[e] == assay for e in f.evaluate) for f in folds]
        unscored = [sum(by_exp[e] == assay for e in f.unscored) for f in folds]
        if n >= 3:
            assert min(per_fold) >= 1 and max(per_fold) - min(per_fold) <= 1, assay
            assert sum(unscored) == 0
        else:
            assert sum(per_fold) == 0 and sum(unscored) == n, assay
    assert folds.params["unscored_assays"] == ["EP300", "MAX", "RAD21", "RNA"]
    sizes = [len(h) for h in held]
    assert max(sizes) - min(sizes) <= 1


def test_experiment_folds_deterministic_by_seed(table: pd.DataFrame):
    a = F.experiment_folds(table, target_species="mouse", seed=7)
    b = F.experiment_folds(make_table(seed=99), target_species="mouse", seed=7)  # rows shuffled
    assert a.to_dict() == b.to_dict()
    c = F.experiment_folds(table, target_species="mouse", seed=8)
    assert a.to_dict()["folds"] != c.to_dict()["folds"]


def test_zero_shot_folds_hold_out_whole_assays(table: pd.DataFrame):
    folds = F.zero_shot_folds(table, 3, target_species="mouse", seed=3)
    _check_partition(folds, table)
    parts = folds.params["partitions"]
    mouse_protein = {a for a, n in MOUSE.items() if CATEGORY[a] == "protein_binding"}
    flat = [a for p in parts.values() for a in p]
    assert sorted(flat) == sorted(mouse_protein)  # disjoint, complete; ZNF143 (human only) out
    sizes = [len(f.evaluate) for f in folds]
    assert max(sizes) - min(sizes) <= max(MOUSE[a] for a in mouse_protein)  # greedy balance
    for f in folds:
        assays = parts[f.name]
        removed = _ids(table, species="mouse", assay=assays)
        assert set(f.evaluate) == removed  # evaluate exactly those
        assert not removed & set(f.train)  # no target-species experiment of them trains
        assert _ids(table, species="human", assay=assays) <= set(f.train)  # human ones do
        assert _ids(table, species="mouse", category="histone_modification") <= set(f.train)
    again = F.zero_shot_folds(make_table(5), 3, target_species="mouse", seed=3)
    assert again.to_dict() == folds.to_dict()
    scored = F.zero_shot_folds(table, 3, target_species="mouse", seed=3, min_scored=3)
    un = set().union(*(set(f.unscored) for f in scored))
    assert un == _ids(table, species="mouse", assay=["RAD21", "EP300", "MAX"])


def test_zero_shot_category_fold(table: pd.DataFrame):
    folds = F.zero_shot_category_fold(table, target_species="mouse")
    _check_partition(folds, table)
    (fold,) = folds
    assert fold.name == "all"
    assert set(fold.evaluate) == _ids(table, species="mouse", category="protein_binding")
    assert _ids(table, species="human", category="protein_binding") <= set(fold.train)


def test_leave_one_out_and_manifest_folds(table: pd.DataFrame):
    loo = F.leave_one_out_folds(table, target_species="mouse")
    _check_partition(loo, table)
    assert len(loo) == sum(MOUSE.values())
    assert all(f.evaluate == (f.name,) for f in loo)
    sub = F.leave_one_out_folds(table, target_species="mouse", experiments=["m00.CTCF"])
    assert sub.names == ["m00.CTCF"]
    # a fold column (as a manifest would carry it) reproduces the CV's held-out sets
    cv = F.experiment_folds(table, target_species="mouse", seed=2)
    col = cv.fold_column()
    with_col = table.assign(fold=table["experiment"].map(col))
    assert with_col["fold"].isna().sum() == len(_ids(table, species="human"))
    man = F.manifest_folds(with_col)
    _check_partition(man, table)
    assert man.names == cv.names
    for a, b in zip(man, cv, strict=True):
        assert set(a.evaluate) == set(b.held_out) and a.train == b.train
    # integer fold numbers, NaN = always train
    ints = table.assign(
        fold=[(i % 2) if s == "mouse" else np.nan for i, s in enumerate(table["species"])]
    )
    man = F.manifest_folds(ints)
    assert man.names == ["fold0", "fold1"]
    twice = F.Folds(
        "custom",
        (F.Fold("a", train=("x",), evaluate=("y",)), F.Fold("b", train=("x",), evaluate=("y",))),
    )
    with pytest.raises(ConfigError, match=r"experiment 'y' is held out in folds 'a' and 'b'"):
        twice.fold_column()


def test_save_and_load(tmp_path: Path, table: pd.DataFrame):
    folds = F.zero_shot_folds(table, 3, target_species="mouse", seed=4)
    path = tmp_path / "folds.json"
    text = folds.to_json(path)
    assert json.loads(path.read_text())["format"] == F.FOLDS_FORMAT
    back = F.Folds.from_json(path)
    assert back == F.Folds.from_json(text)
    assert back.to_dict() == folds.to_dict()
    with pytest.raises(InputDataError, match=r"folds.json: file exists"):
        folds.to_json(path)
    folds.to_json(path, overwrite=True)
    frame = folds.to_frame()
    assert list(frame.columns) == ["fold", "experiment", "role"]
    assert len(frame) == len(folds) * len(table)
    again = F.Folds.from_frame(frame, kind=folds.kind, params=folds.params)
    assert again.to_dict() == folds.to_dict()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other/9", "folds": []}))
    with pytest.raises(InputDataError, match=r"bad.json: format is 'other/9'"):
        F.Folds.from_json(bad)
    other = make_table().iloc[:-1]
    with pytest.raises(InputDataError, match=r"of the folds not in the table"):
        back.check(other)


def test_invalid_tables_and_options(table: pd.DataFrame):
    with pytest.raises(InputDataError, match=r"lacks column\(s\) \['category'\]"):
        F.experiment_folds(table.drop(columns="category"), target_species="mouse")
    dup = pd.concat([table, table.iloc[:1]])
    with pytest.raises(InputDataError, match=r"experiment .*: appears in rows"):
        F.experiment_folds(dup, target_species="mouse")
    empty = table.copy()
    empty.loc[0, "assay"] = ""
    name = empty.loc[0, "experiment"]
    with pytest.raises(InputDataError, match=rf"experiment {name}: assay is empty"):
        F.experiment_folds(empty, target_species="mouse")
    with pytest.raises(ConfigError, match=r"2 species \['human', 'mouse'\].*target_species"):
        F.experiment_folds(table)
    with pytest.raises(ConfigError, match=r"k is 1"):
        F.experiment_folds(table, 1, target_species="mouse")
    with pytest.raises(InputDataError, match=r"target species 'rat' has no experiment"):
        F.experiment_folds(table, target_species="rat")
    with pytest.raises(InputDataError, match=r"6 assay\(s\) of category 'protein_binding'.*k=7"):
        F.zero_shot_folds(table, 7, target_species="mouse")
    mixed = table.copy()
    mixed.loc[mixed["experiment"] == "h00.CTCF", "category"] = "other"
    with pytest.raises(InputDataError, match=r"assay CTCF: categories \['other', 'protein_bind"):
        F.zero_shot_folds(mixed, target_species="mouse")
    with pytest.raises(InputDataError, match=r"no experiment of category 'chromatin'"):
        F.zero_shot_category_fold(table, category="chromatin", target_species="mouse")
    with pytest.raises(InputDataError, match=r"both train and evaluate"):
        F.Folds("custom", (F.Fold("f", train=("a", "b"), evaluate=("b",)),))
    # without folds in the manifest, the error says how to train on everything instead
    with pytest.raises(InputDataError, match=r"no 'fold' column.*set folds\.scheme: all"):
        F.manifest_folds(table)
    with pytest.raises(InputDataError, match=r"every 'fold' value .* empty.*folds\.scheme: all"):
        F.manifest_folds(table.assign(fold=""))


# ---------------------------------------------------------------------------------------------
# PREDICTD


@pytest.fixture(scope="module")
def splits() -> dict:
    if not SPLITS.is_file():
        pytest.skip("shared/data/roadmap/predictd_splits.json not available")
    return json.loads(SPLITS.read_text())


def _roadmap_table(tracks: list[str]) -> pd.DataFrame:
    rows = []
    for t in tracks:
        b, a = t.split("-", 1)
        cat = {"DNase": "accessibility"}.get(a, "histone_modification")
        rows.append((f"{b}.{a}", "human", "hg19", b, a, cat))
    return pd.DataFrame(rows, columns=list(F.TABLE_COLUMNS))


def test_predictd_split_counts(splits: dict):
    tracks = splits["train"] + splits["val"] + splits["test"]
    table = _roadmap_table(tracks)
    folds = F.predictd_folds(table, SPLITS)
    _check_partition(folds, table)
    (fold,) = folds
    assert (len(fold.train), len(fold.validate), len(fold.evaluate)) == (709, 102, 203)
    assert folds.params["counts"] == {"train": 709, "validate": 102, "evaluate": 203}
    assert "E003.H3K4me3" in fold.train + fold.validate + fold.evaluate
    assert set(fold.evaluate) == {t.replace("-", ".", 1) for t in splits["test"]}


def test_predictd_partial_and_bad_tables(splits: dict):
    tracks = splits["train"] + splits["val"] + splits["test"]
    partial = _roadmap_table(tracks[:-10])
    with pytest.raises(InputDataError, match=r"10 track\(s\) of the split not in the table"):
        F.predictd_folds(partial, splits)
    with pytest.warns(EpirayWarning, match=r"10 track\(s\) of the split"):
        folds = F.predictd_folds(partial, splits, missing="skip")
    assert folds.params["skipped_tracks"] == 10
    assert len(folds[0].evaluate) == 203 - 10  # the last 10 tracks are test tracks
    extra = pd.concat([_roadmap_table(tracks), _roadmap_table(["E999-H3K4me3"])])
    with pytest.raises(InputDataError, match=r"E999.H3K4me3 \(E999-H3K4me3\)"):
        F.predictd_folds(extra, splits)
    dup = _roadmap_table(tracks)
    dup.loc[len(dup)] = ("E003.H3K4me3.rep2", "human", "hg19", "E003", "H3K4me3", "x")
    with pytest.raises(InputDataError, match=r"track E003-H3K4me3: experiments"):
        F.predictd_folds(dup, splits)
    with pytest.raises(InputDataError, match=r"expected exactly \['test', 'train', 'val'\]"):
        F.predictd_folds(dup, {"train": [], "test": []})


# ------------------------------------------------------------------------- validation cells
def test_heldout_blocks_do_not_depend_on_sharding_or_order():
    exps = [f"mm.B{i}.H3K4me3" for i in range(6)]
    whole = F.heldout_blocks(exps, "chr1", 100_000, 0, 100_000, 0.1, 200, seed=3)
    assert whole.shape == (6, 500)
    assert 0.05 < whole.mean() < 0.15
    assert len({r.tobytes() for r in whole}) == 6  # every track its own blocks
    # two workers' shards (on 5 kbp multiples) give the same blocks
    left = F.heldout_blocks(exps, "chr1", 100_000, 0, 40_000, 0.1, 200, seed=3)
    right = F.heldout_blocks(exps, "chr1", 100_000, 40_000, 100_000, 0.1, 200, seed=3)
    assert np.array_equal(np.concatenate([left, right], 1), whole)
    # a track's blocks do not depend on the other tracks, their order or the chromosome's
    alone = F.heldout_blocks(exps[3:4], "chr1", 100_000, 0, 100_000, 0.1, 200, seed=3)
    assert np.array_equal(alone[0], whole[3])
    other = F.heldout_blocks(exps, "chr2", 100_000, 0, 100_000, 0.1, 200, seed=3)
    assert not np.array_equal(other, whole)
    with pytest.raises(ConfigError, match="fraction 0.9"):
        F.heldout_blocks(exps, "chr1", 1000, 0, 1000, 0.9)


def test_heldout_fraction_bounds_the_cells():
    assert F.heldout_fraction(30, 25_000, 0.05, 500_000) == 0.05
    f = F.heldout_fraction(1145, 7_800_000, 0.05, 500_000)
    assert f * 1145 * 7_800_000 == pytest.approx(500_000)
