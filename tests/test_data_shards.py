"""The shard format and writer: any source -> Arrow IPC shards + manifest, at any fsspec URL."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from actors.data import ShardError, read_manifest, write_shards
from actors.data.store import BufferPool, ShardStore
from jobs.examples.datasets import classification, copy_task_tokens
from orchestrator import cli
from orchestrator.storage import Storage


def _read_all(url, storage_options=None, tmp=None) -> dict[str, np.ndarray]:
    m = read_manifest(url, storage_options)
    store = ShardStore(url, storage_options, tmp)
    return store.gather(np.arange(m.num_samples))


def test_numpy_columns_keep_dtype_and_shape_and_gain_global_id(tmp_path):
    d = classification(n=1000, in_dim=8)
    m = write_shards(d, str(tmp_path / "ds"), rows_per_shard=300, progress=False)
    assert m.num_samples == 1000 and m.num_shards == 4
    assert [s.rows for s in m.shards] == [300, 300, 300, 100]
    assert m.schema == {"id": {"dtype": "int64", "shape": []}, "x": {"dtype": "float32", "shape": [8]},
                        "y": {"dtype": "int64", "shape": []}}
    rows = _read_all(str(tmp_path / "ds"), tmp=str(tmp_path / "cache"))
    np.testing.assert_array_equal(rows["id"], np.arange(1000))
    np.testing.assert_array_equal(rows["x"], d["x"])
    np.testing.assert_array_equal(rows["y"], d["y"])
    assert rows["x"].dtype == np.float32


def test_manifest_records_rows_bytes_and_checksum_of_every_shard(tmp_path):
    m = write_shards(copy_task_tokens(n=200, seq_len=16), str(tmp_path), rows_per_shard=64, progress=False)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["num_samples"] == 200 and len(doc["shards"]) == 4
    for s in m.shards:
        data = (tmp_path / s.name).read_bytes()
        assert len(data) == s.bytes
        import hashlib
        assert hashlib.sha256(data).hexdigest() == s.sha256
    assert read_manifest(str(tmp_path)).schema["x"] == {"dtype": "int64", "shape": [16]}


def test_iterable_of_chunks_is_resharded_to_fixed_rows_per_shard(tmp_path):
    chunks = ({"v": np.arange(i, i + k, dtype=np.int32)} for i, k in [(0, 7), (7, 50), (57, 3)])
    m = write_shards(chunks, str(tmp_path), rows_per_shard=16, progress=False)
    assert [s.rows for s in m.shards] == [16, 16, 16, 12]
    rows = _read_all(str(tmp_path), tmp=str(tmp_path / "c"))
    np.testing.assert_array_equal(rows["v"], np.arange(60, dtype=np.int32))


class _Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 50

    def __getitem__(self, i):
        return torch.full((3,), float(i)), i * i


def test_map_style_torch_dataset_becomes_x_y_columns(tmp_path):
    m = write_shards(_Squares(), str(tmp_path), rows_per_shard=20, progress=False)
    assert m.num_samples == 50 and set(m.schema) == {"id", "x", "y"}
    rows = _read_all(str(tmp_path), tmp=str(tmp_path / "c"))
    np.testing.assert_array_equal(rows["y"], np.arange(50) ** 2)
    np.testing.assert_array_equal(rows["x"][:, 0], np.arange(50, dtype=np.float32))


def test_parquet_directory_on_s3_becomes_shards_on_s3(s3):
    st = Storage(s3)
    for part in range(2):
        n0 = part * 30
        t = pa.table({"f": np.arange(n0, n0 + 30, dtype=np.float64),
                      "seq": pa.array([[i, i + 1] for i in range(n0, n0 + 30)], pa.list_(pa.int64()))})
        sink = pa.BufferOutputStream()
        pq.write_table(t, sink, row_group_size=8)
        st.write_bytes(f"raw/part-{part}.parquet", sink.getvalue().to_pybytes())
    m = write_shards(f"{s3}/raw", f"{s3}/ds", rows_per_shard=25, progress=False)
    assert m.num_samples == 60 and m.schema["seq"] == {"dtype": "int64", "shape": [2]}
    rows = _read_all(f"{s3}/ds")
    np.testing.assert_array_equal(rows["f"], np.arange(60, dtype=np.float64))
    np.testing.assert_array_equal(rows["seq"][:, 1], np.arange(1, 61))


@pytest.mark.parametrize("source, match", [
    ({"x": np.zeros((4, 2)), "y": np.zeros(3)}, "column 'y' has 3 rows"),
    ({"id": np.zeros(4)}, "column 'id' is reserved"),
    ({"s": np.array(["a", "b"])}, "column 's' dtype"),
    ({}, "non-empty dict"),
    (42, "source: expected"),
])
def test_bad_source_is_rejected_naming_the_column(tmp_path, source, match):
    with pytest.raises(ValueError, match=match):
        write_shards(source, str(tmp_path), progress=False)
    assert not (tmp_path / "manifest.json").exists()


def test_bad_rows_per_shard_is_rejected_by_name(tmp_path):
    with pytest.raises(ValueError, match="rows_per_shard"):
        write_shards({"x": np.zeros(3)}, str(tmp_path), rows_per_shard=0, progress=False)


def test_missing_dataset_names_the_manifest_url(tmp_path):
    with pytest.raises(ShardError, match="manifest.json not found"):
        read_manifest(str(tmp_path / "nothing"))


def test_cli_writes_from_a_factory_and_inspect_verifies_checksums(tmp_path, capsys):
    url = str(tmp_path / "ds")
    rc = cli.main(["data", "write", "jobs.examples.datasets:classification", url, "--arg", "n=300",
                   "--rows-per-shard", "128", "--no-progress"])
    assert rc == 0 and "wrote 300 samples in 3 shards" in capsys.readouterr().out
    assert cli.main(["data", "inspect", url, "--verify", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_samples"] == 300 and out["verified"] is True
    shard = tmp_path / "ds" / "shards" / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cli.main(["data", "inspect", url, "--verify"]) == 2
    err = capsys.readouterr().err
    assert "shard 1" in err and "shard-00001.arrow" in err and "corrupt" in err


def test_cli_write_from_npz(tmp_path, capsys):
    np.savez(tmp_path / "a.npz", x=np.ones((10, 2), np.float32), y=np.arange(10))
    assert cli.main(["data", "write", str(tmp_path / "a.npz"), str(tmp_path / "ds"), "--no-progress"]) == 0
    assert read_manifest(str(tmp_path / "ds")).num_samples == 10
    assert cli.main(["data", "inspect", str(tmp_path / "ds")]) == 0
    assert "x: float32[2]" in capsys.readouterr().out


def test_column_view_is_zero_copy_and_handles_slices_and_bools():
    import pyarrow as pa

    from actors.data.shards import column_view
    x = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 3)
    v = column_view(arr, "float32", [3])
    assert np.array_equal(v, x) and not v.flags["OWNDATA"]          # a view over Arrow's buffer
    assert np.array_equal(column_view(arr.slice(2, 2), "float32", [3]), x[2:4])  # offset honoured
    chunked = pa.chunked_array([arr.slice(0, 2), arr.slice(2, 3)])
    assert np.array_equal(column_view(chunked, "float32", [3]), x)
    b = np.array([True, False, True])
    assert np.array_equal(column_view(pa.array(b), "bool", []), b)   # bit-packed: copied, still right


@pytest.mark.parametrize("use_region", [True, False])
def test_gather_returns_rows_in_request_order_for_every_column_layout(tmp_path, monkeypatch, use_region):
    """One strided copy from the shard region (Linux), a patch for shards off the column's stride
    (the short last one) and shard-by-shard for copied columns (bool) give the same rows."""
    from actors.data import region
    if not use_region:
        monkeypatch.setattr(region, "available", lambda: False)
    elif not region.available():
        pytest.skip("shard regions need Linux")
    rng = np.random.default_rng(0)
    n = 1037  # 10 shards of 100 and a short one of 37
    cols = {"x": rng.standard_normal((n, 3, 5)).astype(np.float32), "tok": rng.integers(0, 9, n).astype(np.int16),
            "big": rng.integers(0, 255, (n, 4096)).astype(np.uint8), "flag": rng.random(n) < 0.5}
    write_shards(cols, str(tmp_path / "ds"), rows_per_shard=100, progress=False)
    store = ShardStore(str(tmp_path / "ds"), None, str(tmp_path / "cache"))
    assert (store._region is not None) == use_region
    pool = BufferPool(2)
    held = []  # every batch stays referenced: pooled buffers must never be written over
    for ids in (rng.permutation(n)[:300], np.array([1036, 0, 1036, 500]), np.arange(1000, 1037), np.zeros(0, np.int64),
                rng.permutation(n)[:300], rng.permutation(n)[:300]):
        for got in (store.gather(ids), store.gather(ids, pool)):
            held.append((ids, got))
            for k, v in cols.items():
                assert got[k].dtype == v.dtype and got[k].shape == (len(ids), *v.shape[1:])
                assert np.array_equal(got[k], v[ids]), k
            assert np.array_equal(got["id"], ids)
    for ids, got in held:
        for k, v in cols.items():
            assert np.array_equal(got[k], v[ids]), k
    if use_region:  # the wide column is strided over all shards but the short last one
        assert (store._rowbase["big"] >= 0).sum() >= 10 and "flag" not in store._views


def test_buffer_pool_hands_out_again_only_buffers_nothing_references():
    """A pooled output array is reused once the caller has dropped it and every view or tensor
    made from it, never while any of them is alive."""
    import torch
    pool = BufferPool(4)
    a = pool.take((3, 4), np.float32)
    b = pool.take((3, 4), np.float32)
    assert a is not b and pool.allocated == 2
    view, a_id = a[1:], id(a)
    del a
    c = pool.take((3, 4), np.float32)             # a lives on through its view
    assert id(c) != a_id and c is not b and pool.allocated == 3
    del view
    assert id(pool.take((3, 4), np.float32)) == a_id and pool.allocated == 3
    t, b_id = torch.from_numpy(b)[1:], id(b)
    del b
    d = pool.take((3, 4), np.float32)
    assert id(d) not in (b_id, id(c))  # b is held by a tensor slice
    del t
    assert id(pool.take((3, 4), np.float32)) == b_id
    assert pool.take((5,), np.int64).shape == (5,)  # other shapes have their own buffers
    with pytest.raises(ValueError, match="max_per_shape"):
        BufferPool(0)


def test_shards_of_2mib_and_more_sit_on_2mib_boundaries_and_gather_the_same_rows(tmp_path):
    """Large shards get 2 MiB-aligned slots (huge-page mappable); rows come back unchanged."""
    from actors.data import region
    if not region.available():
        pytest.skip("shard regions need Linux")
    rng = np.random.default_rng(1)
    n = 1500  # 2 shards of 600 rows x 4 KiB (2.4 MiB each) and a short one of 300
    cols = {"x": rng.integers(0, 255, (n, 4096)).astype(np.uint8), "y": rng.standard_normal(n).astype(np.float32)}
    write_shards(cols, str(tmp_path / "ds"), rows_per_shard=600, progress=False)
    store = ShardStore(str(tmp_path / "ds"), None, str(tmp_path / "cache"))
    ids = rng.permutation(n)
    got = store.gather(ids, BufferPool(2))
    assert store._region.base % (2 << 20) == 0 and store._region.slot % (2 << 20) == 0
    for k, v in cols.items():
        assert np.array_equal(got[k], v[ids]), k
    assert np.array_equal(got["id"], ids)


def test_cli_inspect_verify_of_a_remote_dataset_with_a_corrupt_shard_exits_2_and_keeps_nothing(
        s3, tmp_path, monkeypatch, capsys):
    """Every shard is read in parallel and checked; the first bad one is named once the readers
    have stopped, and nothing is left on local disk (no temporary cache to clean up)."""
    import tempfile
    url = f"{s3}/ds"
    write_shards({"v": np.arange(2000)}, url, rows_per_shard=50, progress=False)
    st = Storage(url)
    data = bytearray(st.read_bytes("shards/shard-00003.arrow"))
    data[-64] ^= 0xFF
    st.write_bytes("shards/shard-00003.arrow", bytes(data))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)
    for _ in range(3):
        assert cli.main(["data", "inspect", url, "--verify"]) == 2
        err = capsys.readouterr().err
        assert "shard 3" in err and "is corrupt" in err and "Traceback" not in err
    assert list(scratch.iterdir()) == []
