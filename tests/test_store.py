import numpy as np
import pytest
import torch

from epiray.errors import StoreError
from epiray.genome import Assembly
from epiray.store import (
    ROW_GROUP_BLOCKS,
    Store,
    atomic_open,
    decode_block,
    read_part_meta,
    write_part,
)

N = 100 * ROW_GROUP_BLOCKS * 3 + 37  # three and a bit row groups of 100-bin blocks


def make_store(tmp_path, dtype="float32", n_exp=3):
    s = Store.create(tmp_path / "s", dtype=dtype, block_bins=100)
    s.add_assembly(Assembly("asm", "mouse", {"chr1": N * 25 - 3}), ["chr1"])
    rng = np.random.default_rng(1)
    X = rng.random((n_exp, N)).astype(np.float32) * 3
    for i in range(n_exp):
        e = f"e{i}"
        write_part(
            s.part_path("asm", "chr1", e),
            X[i],
            dtype=dtype,
            block_bins=100,
            meta={"experiment": e, "stats": {"n": N, "sum": 1.0, "sumsq": 1.0}},
        )
        s.summary["experiments"][e] = {
            "assembly": "asm",
            "species": "mouse",
            "chroms": {"chr1": {"n": N, "sum": 1.0, "sumsq": 1.0}},
        }
    s.save_summary()
    return Store.open(s.root), X


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    "start,end",
    [
        (0, None),
        (5, 17),
        (99, 101),
        (6399, 6401),
        (6400, 12800),
        (100, N - 1),
        (N - 37, N),
        (12000, 19237),
    ],
)
def test_read_ranges_exact(tmp_path, dtype, start, end):
    s, X = make_store(tmp_path, dtype)
    ref = X.astype(dtype).astype(np.float32)
    e = N if end is None else end
    got = s.read("asm", "chr1", ["e2", "e0"], start, end)
    assert got.shape == (2, e - start) and got.dtype == np.float32
    np.testing.assert_array_equal(got, ref[[2, 0], start:e])


def test_float16_keeps_store_bytes(tmp_path):
    s, X = make_store(tmp_path, "float16")
    got = s.read("asm", "chr1", ["e1"], dtype="float16")
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got[0], X[1].astype(np.float16))


def test_subset_never_reads_others(tmp_path):
    s, X = make_store(tmp_path)
    s.part_path("asm", "chr1", "e1").write_bytes(b"garbage")  # would fail if touched
    np.testing.assert_array_equal(s.read("asm", "chr1", ["e0", "e2"])[1], X[2])


def test_read_torch_shares_memory(tmp_path):
    s, X = make_store(tmp_path)
    t = s.read_torch("asm", "chr1", ["e0"], 0, 1000)
    assert isinstance(t, torch.Tensor) and t.shape == (1, 1000)
    arr = s.read("asm", "chr1", ["e0"], 0, 1000)
    t2 = torch.from_numpy(arr)
    assert t2.data_ptr() == arr.ctypes.data  # the documented no-copy path
    np.testing.assert_array_equal(t.numpy(), X[:1, :1000])


def test_errors(tmp_path):
    s, _ = make_store(tmp_path)
    with pytest.raises(StoreError, match="experiment 'zz' not in the store"):
        s.read("asm", "chr1", ["zz"])
    with pytest.raises(StoreError, match="no data for chrom 'chr2'"):
        s.read("asm", "chr2", ["e0"])
    with pytest.raises(StoreError, match="bad bin range"):
        s.read("asm", "chr1", ["e0"], 10, 5)
    with pytest.raises(StoreError, match="already exists.*--overwrite.*--resume"):
        Store.create(s.root)
    with pytest.raises(StoreError, match="not an epiray store"):
        Store.open(tmp_path)


def test_damaged_part_is_an_error(tmp_path):
    s, X = make_store(tmp_path)
    write_part(
        s.part_path("asm", "chr1", "e0"), X[0, :500], dtype="float32", block_bins=100, meta={}
    )
    with pytest.raises(StoreError, match="fewer bins than expected"):
        s.read("asm", "chr1", ["e0"])


def test_atomic_open_replaces_only_when_the_write_completes(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    with atomic_open(path) as f:
        f.write(b"first")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_open(path) as f:
            f.write(b"half of the sec")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"first"  # the old file stands, no temporary is left
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]


def test_write_is_atomic_and_meta_roundtrips(tmp_path):
    p = tmp_path / "a" / "part.parquet"
    write_part(p, np.arange(10.0), dtype="float32", block_bins=4, meta={"checksum": "x"})
    assert read_part_meta(p)["checksum"] == "x"
    assert read_part_meta(p)["n_bins"] == 10
    assert [x.name for x in p.parent.iterdir()] == ["part.parquet"]
    assert read_part_meta(tmp_path / "nope.parquet") is None


@pytest.mark.ray
def test_dataset_view(tmp_path, ray_local):
    s, X = make_store(tmp_path, "float16")
    ds = s.dataset("asm", experiments=["e1", "e2"])
    rows = ds.take_all()
    assert {r["experiment"] for r in rows} == {"e1", "e2"}
    assert {r["chrom"] for r in rows} == {"chr1"}
    for e in ("e1", "e2"):
        blocks = sorted((r for r in rows if r["experiment"] == e), key=lambda r: r["start_bin"])
        vals = np.concatenate([decode_block(r["values"], "float16") for r in blocks])
        np.testing.assert_array_equal(vals, X[int(e[1])].astype(np.float16))


def test_copy_without_leaves_out_parts_and_entries(tmp_path):
    s, X = make_store(tmp_path, n_exp=3)
    c = s.copy(tmp_path / "copy", without=["e1"])
    assert sorted(c.summary["experiments"]) == ["e0", "e2"]
    assert not c.part_path("asm", "chr1", "e1").exists()
    np.testing.assert_array_equal(c.read("asm", "chr1", ["e0", "e2"]), X[[0, 2]])
    # the source is untouched and no temporary folder is left beside the copy
    assert sorted(Store.open(s.root).summary["experiments"]) == ["e0", "e1", "e2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "s"]
    with pytest.raises(StoreError, match=r"copy.*exists"):
        s.copy(tmp_path / "copy")
    with pytest.raises(StoreError, match="no experiment.*nope"):
        s.copy(tmp_path / "other", without=["nope"])
    assert not (tmp_path / "other").exists()
