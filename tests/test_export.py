"""``epiray export``: trained runs to Parquet, bigWig, TSV and .npz, read back without epiray."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.csv as pc
import pyarrow.parquet as pq
import pyBigWig
import pytest
import torch

from epiray.cli import main
from epiray.errors import ConfigError, EpirayError
from epiray.export import export
from epiray.genome import Assembly
from epiray.loader import shard_bounds
from epiray.loop import LoopParams, fit, save_checkpoint
from epiray.models import Vocabulary, chrom_data_from_numpy
from epiray.store import Store, write_part
from epiray.train import load_shards

pytestmark = pytest.mark.usefixtures("one_torch_thread_seeded")

# lengths not multiples of 25; chr1 is cut into two worker shards at bin 200
SIZES = {"chr1": 25 * 450 + 7, "chr2": 25 * 120}
EXPERIMENTS = [  # experiment, biosample, assay
    ("mm.B1.H3K4me3", "mm.B1", "H3K4me3"),
    ("mm.B2.H3K4me3", "mm.B2", "H3K4me3"),
    ("mm.B2.CTCF", "mm.B2", "CTCF"),
    ("mm.B3.DNase", "mm.B3", "DNase"),
]
TINY = dict(n_biosample_factors=3, n_assay_factors=4, n_genome_factors=(3, 2, 2), n_nodes=8)


def make_store(root: Path) -> Store:
    rng = np.random.default_rng(0)
    store = Store.create(root, block_bins=64)
    store.add_assembly(Assembly("mmToy1", "mouse", SIZES), list(SIZES))
    for exp, bio, assay in EXPERIMENTS:
        chroms = {}
        for chrom, length in SIZES.items():
            vals = np.arcsinh(rng.gamma(1.0, 2.0, -(-length // 25))).astype(np.float32)
            write_part(
                store.part_path("mmToy1", chrom, exp),
                vals,
                dtype="float32",
                block_bins=64,
                meta={"experiment": exp},
            )
            chroms[chrom] = {"n": len(vals), "sum": float(vals.sum()), "sumsq": 0.0}
        store.summary["experiments"][exp] = {
            "species": "mouse",
            "assembly": "mmToy1",
            "biosample": bio,
            "assay": assay,
            "category": "other",
            "path": f"{exp}.bw",
            "checksum": f"sha256:{exp}",
            "chroms": chroms,
        }
    store.save_summary()
    return store


def fake_run(store: Store, run_dir: Path, chrom: str, world: int, model: str, params: dict):
    """A finished run laid out as `epiray train` writes it (checkpoint folder with meta.json
    and one rank file per worker), trained for one epoch without Ray."""
    from epiray.models import get_model

    exps = store.experiments()
    n = store.n_bins("mmToy1", chrom)
    vocab = Vocabulary.from_records(exps, chrom=chrom, n_bins=n, assembly="mmToy1")
    train = list(exps["experiment"])
    values = store.read("mmToy1", chrom, train)
    keys = [vocab.experiment_index(e) for e in train]
    klass = get_model(model)
    ckpt = run_dir / "epoch0001_final"
    shards, models = [list(shard_bounds(n, world, r)) for r in range(world)], []
    for r, (lo, hi) in enumerate(shards):
        data = chrom_data_from_numpy(
            values,
            [k.biosample for k in keys],
            [k.assay for k in keys],
            chrom=chrom,
            lo=lo,
            hi=hi,
            n_bins=n,
            device="cpu",
        )
        m = klass.build(klass.Params.model_validate(params), vocab, data)
        state = fit(m, data, LoopParams(epochs=1, batch_size=64, patience=None))
        if r:  # the workers' dense parameters are synchronised in training
            m.load_dense_state(models[0].state_dict())
        models.append(m)
        save_checkpoint(ckpt / f"rank{r}.pt", m, state)
    meta = {
        "model": model,
        "label": f"{model}_test",
        "params": params,
        "vocab": vocab.to_dict(),
        "store": str(store.root),
        "assembly": "mmToy1",
        "chrom": chrom,
        "fold": "fold0",
        "n_bins": n,
        "shards": shards,
        "train": train,
        "validate": [],
        "evaluate": [],
        "aux_name": None,
        "aux": [],
        "value_dtype": "float32",
        "epoch": 1,
        "final": True,
        "best_epoch": None,
    }
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return models


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """chr1 (two workers) and chr2 (one) of a tiny Avocado, and an unfinished chr3 folder."""
    root = tmp_path_factory.mktemp("export")
    store = make_store(root / "store")
    torch.manual_seed(0)
    for chrom, world in (("chr1", 2), ("chr2", 1)):
        fake_run(store, root / "runs" / f"avocado.{chrom}.fold0", chrom, world, "avocado", TINY)
    return root, store


def expected_rows(store, run_dir: Path, scale_index: int, k: int) -> np.ndarray:
    """The factors of every row of a scale from the loaded model's shards (global rows)."""
    shards = load_shards(run_dir / "epoch0001_final", device="cpu", store=store, tracks=False)
    n = shards[-1][1].hi
    out = np.full((-(-n // k), shards[0][0].genome[scale_index].weight.shape[1]), np.nan)
    for m, d in shards:
        w = m.genome[scale_index].weight.detach().numpy()
        out[d.lo // k : d.lo // k + len(w)] = w
    return out.astype(np.float32)


def test_avocado_export_reads_back_with_pyarrow_and_pybigwig(runs, tmp_path):
    root, store = runs
    out = tmp_path / "exp"
    res = export(str(root / "runs" / "avocado.{chrom}.fold0"), out, chroms=["chr1", "chr2"])
    assert res.chroms == ["chr1", "chr2"] and out.is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    doc = json.loads((out / "export.json").read_text())
    assert [s["bp_per_row"] for s in doc["genome_scales"]] == [25, 250, 5000]
    for f in doc["files"]:
        assert (out / f["path"]).is_file(), f["path"]

    for j, k in enumerate((1, 10, 200)):
        name = f"scale{25 * k}bp"
        for chrom, length in SIZES.items():
            want = expected_rows(store, root / "runs" / f"avocado.{chrom}.fold0", j, k)
            t = pq.read_table(out / "genome" / f"{chrom}.{name}.parquet")
            assert t.column_names == ["chrom", "start", "end"] + [
                f"f{i}" for i in range(want.shape[1])
            ]
            assert set(t["chrom"].to_pylist()) == {chrom} and t.num_rows == len(want)
            r = np.arange(len(want))
            np.testing.assert_array_equal(t["start"].to_numpy(), r * k * 25)
            np.testing.assert_array_equal(
                t["end"].to_numpy(), np.minimum((r + 1) * k * 25, length)
            )
            got = np.stack([t[f"f{i}"].to_numpy() for i in range(want.shape[1])], 1)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want)
            # the bigWig of each factor holds the same rows at the scale's resolution
            for i in range(want.shape[1]):
                bw = pyBigWig.open(str(out / "genome" / "bigwig" / name / f"factor{i}.bw"))
                assert bw.chroms() == SIZES
                iv = bw.intervals(chrom)
                bw.close()
                assert [(s, e) for s, e, _ in iv] == list(
                    zip(t["start"].to_pylist(), t["end"].to_pylist())
                )
                np.testing.assert_array_equal(np.array([v for *_, v in iv], np.float32), got[:, i])

    for chrom in SIZES:
        (m, _), *rest = load_shards(
            root / "runs" / f"avocado.{chrom}.fold0" / "epoch0001_final",
            device="cpu",
            store=store,
            tracks=False,
        )
        # biosample / assay factors: one TSV row per vocabulary name, exact float32 values
        for axis, want, names in zip(
            ("biosample", "assay"), m.embeddings(), (m.vocab.biosamples, m.vocab.assays)
        ):
            t = pc.read_csv(
                out / "models" / chrom / f"{axis}_factors.tsv",
                parse_options=pc.ParseOptions(delimiter="\t"),
            )
            assert t["name"].to_pylist() == list(names)
            assert set(t["species"].to_pylist()) == {"mouse"}
            got = np.stack([t[f"f{i}"].to_numpy() for i in range(want.shape[1])], 1)
            np.testing.assert_array_equal(got.astype(np.float32), want.numpy())
        # weights: every tensor but the genome factors, under its state-dict name
        w = np.load(out / "models" / chrom / "weights.npz")
        sd = {k: v for k, v in m.state_dict().items() if not k.startswith("genome.")}
        assert sorted(w.files) == sorted(sd)
        for key, v in sd.items():
            np.testing.assert_array_equal(w[key], v.numpy())


def test_readme_snippet_and_network_formula_need_no_epiray(runs, tmp_path):
    """The README's reading snippet runs with epiray and torch unimportable, and its network
    formula, computed with numpy from the exported files, gives the model's predictions."""
    root, store = runs
    out = tmp_path / "exp"
    export(str(root / "runs" / "avocado.{chrom}.fold0"), out, chroms=["chr1", "chr2"])
    readme = (out / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    code = "import sys\nsys.modules['epiray'] = sys.modules['torch'] = None\n" + snippet
    code += "\nassert len(names) == 3 and B.shape == (3, 3) and len(iv) == 451\nprint('ok')\n"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=out, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.split()[-1] == "ok", done.stderr

    # y = MLP(concat(B[b], A[a], G25[i], G250[i // 10], G5k[i // 200])) for chr1
    w = np.load(out / "models" / "chr1" / "weights.npz")
    genome = []
    for name, k in (("scale25bp", 1), ("scale250bp", 10), ("scale5000bp", 200)):
        t = pq.read_table(out / "genome" / f"chr1.{name}.parquet")
        g = np.stack([t[c].to_numpy() for c in t.column_names[3:]], 1)
        genome.append(g[np.arange(451) // k])
    b, a = 1, 2  # mm.B2 / DNase: a pair never observed
    x = np.concatenate(
        [
            np.broadcast_to(w["biosample_factors.0"][b], (451, 3)),
            np.broadcast_to(w["assay_factors.0"][a], (451, 4)),
            *genome,
        ],
        1,
    )
    h = np.maximum(x @ w["hidden.0.weight"].T + w["hidden.0.bias"], 0)
    h = np.maximum(h @ w["hidden.1.weight"].T + w["hidden.1.bias"], 0)
    y = h @ w["out.weight"][0] + w["out.bias"][0]
    shards = load_shards(
        root / "runs" / "avocado.chr1.fold0" / "epoch0001_final",
        device="cpu",
        store=store,
        tracks=False,
    )
    want = torch.cat([m.predict(d, b, a) for m, d in shards]).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    assert "hidden.1.weight" in readme and "i // k_s" in readme


def test_missing_checkpoint_is_one_clear_error_and_nothing_is_written(runs, tmp_path, capsys):
    root, _ = runs
    pattern = str(root / "runs" / "avocado.{chrom}.fold0")
    # a run that never finished: a checkpoint of epoch 1 but no final one
    unfinished = tmp_path / "runs" / "avocado.chr1.fold0"
    (unfinished / "epoch0001").mkdir(parents=True)
    out = tmp_path / "deep" / "exp"
    with pytest.raises(EpirayError, match=r"no final checkpoint \(latest: epoch0001\).*Resume"):
        export(str(unfinished), out)
    # a run folder with no checkpoint at all
    empty = tmp_path / "runs" / "avocado.chr2.fold0"
    empty.mkdir()
    with pytest.raises(EpirayError, match=r"chromosome chr2\): no checkpoint.*must finish"):
        export(str(tmp_path / "runs" / "avocado.{chrom}.fold0"), out, chroms=["chr2"])
    # a chromosome with no run folder, and one the single run does not hold
    with pytest.raises(EpirayError, match=r"avocado\.chr3\.fold0 \(chromosome chr3\): run "):
        export(pattern, out, chroms=["chr1", "chr3"])
    with pytest.raises(EpirayError, match=r"chromosome\(s\) \['chr2'\] not in the run"):
        export(root / "runs" / "avocado.chr1.fold0", out, chroms=["chr2"])
    # the command: exit status 2, one message naming the run folder
    assert main(["export", "--run", str(unfinished), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("epiray export: error:") and str(unfinished) in err
    assert not (tmp_path / "deep").exists()
    # every problem of a pattern is reported at once
    with pytest.raises(EpirayError, match=r"2 problems"):
        export(str(tmp_path / "runs" / "avocado.{chrom}.fold0"), out)
    assert not (tmp_path / "deep").exists()


def test_destination_is_replaced_only_whole(runs, tmp_path):
    root, _ = runs
    src = root / "runs" / "avocado.chr1.fold0"
    out = tmp_path / "exp"
    export(src, out, formats="tsv")
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        export(src, out, formats="weights")
    with pytest.raises(ConfigError, match="overlaps the run folder"):
        export(src, root / "runs", overwrite=True)
    with pytest.raises(ConfigError, match="unknown format"):
        export(src, tmp_path / "x", formats="tsv,hdf5")
    # a rank file that cannot be read fails mid-export: the old export stays, no temporaries
    broken = tmp_path / "broken"
    (broken / "epoch0001_final").mkdir(parents=True)
    for f in (src / "epoch0001_final").iterdir():
        (broken / "epoch0001_final" / f.name).write_bytes(f.read_bytes())
    (broken / "epoch0001_final" / "rank1.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EpirayError, match=r"rank1\.pt: cannot read it"):
        export(broken, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "exp"]
    assert sorted(p.name for p in (out / "models" / "chr1").iterdir()) == [
        "assay_factors.tsv",
        "biosample_factors.tsv",
        "model.json",
    ]
    # --overwrite replaces it with the new export
    assert main(["export", "--run", str(src), "--out", str(out), "--overwrite"]) == 0
    assert (out / "models" / "chr1" / "weights.npz").is_file()
    assert (out / "genome" / "bigwig" / "scale5000bp" / "factor1.bw").is_file()


def test_rows_straddling_two_workers_come_from_the_worker_of_their_first_bin(tmp_path):
    """With scale_bins (1, 3, 7) the 200-bin shard boundary cuts rows 66 (k=3) and 28 (k=7)."""
    store = make_store(tmp_path / "store")
    params = dict(TINY, scale_bins=(1, 3, 7))
    models = fake_run(store, tmp_path / "run", "chr1", 2, "avocado", params)
    out = tmp_path / "exp"
    export(tmp_path / "run", out, formats=["parquet"])
    assert not (out / "models" / "chr1" / "weights.npz").exists()
    for j, k in ((1, 3), (2, 7)):
        t = pq.read_table(out / "genome" / f"chr1.scale{25 * k}bp.parquet")
        got = np.stack([t[c].to_numpy() for c in t.column_names[3:]], 1)
        assert t.num_rows == -(-451 // k)
        w0, w1 = (m.genome[j].weight.detach().numpy() for m in models)
        cut = 200 // k  # the straddling row: rank 0's last, rank 1's first
        np.testing.assert_array_equal(got[: cut + 1], w0)
        np.testing.assert_array_equal(got[cut + 1 :], w1[1:])


def test_edice_embeddings_and_no_genome_factors(tmp_path):
    store = make_store(tmp_path / "store")
    params = dict(dim=8, heads=2, ffn_hidden=8, mlp_hidden=8, mlp_layers=1, n_targets=1)
    (model,) = fake_run(store, tmp_path / "edice.chr2.fold0", "chr2", 1, "edice", params)
    out = tmp_path / "exp"
    with pytest.raises(ConfigError, match="no genome factors.*tsv,weights"):
        export(tmp_path / "edice.chr2.fold0", out, formats="tsv,bigwig")
    assert not out.exists()
    res = export(str(tmp_path / "edice.{chrom}.fold0"), out)
    assert res.chroms == ["chr2"] and "no genome factors" in res.describe()
    assert not (out / "genome").exists()
    for axis, want, names in zip(
        ("biosample", "assay"), model.embeddings(), (model.vocab.biosamples, model.vocab.assays)
    ):
        t = pc.read_csv(
            out / "models" / "chr2" / f"{axis}_embeddings.tsv",
            parse_options=pc.ParseOptions(delimiter="\t"),
        )
        assert t["name"].to_pylist() == list(names)
        got = np.stack([t[f"f{i}"].to_numpy() for i in range(8)], 1).astype(np.float32)
        np.testing.assert_array_equal(got, want.numpy())
    w = np.load(out / "models" / "chr2" / "weights.npz")
    sd = model.state_dict()
    assert sorted(w.files) == sorted(sd)
    np.testing.assert_array_equal(
        w["net.biosample_embedder.global_embedding"],
        sd["net.biosample_embedder.global_embedding"].numpy(),
    )
    assert "eDICE has no genome factors" in (out / "README.md").read_text()
