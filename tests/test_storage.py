"""Storage: one module over fsspec; atomic publish; same behaviour on disk, memory and real S3."""

from __future__ import annotations

import logging
import os
import threading
import uuid

import pytest

from orchestrator import storage
from orchestrator.storage import Storage, StorageError


@pytest.fixture(params=["local", "file_url", "memory", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file_url":
        return f"file://{tmp_path}/root"
    if request.param == "memory":
        return f"memory://test-{uuid.uuid4().hex[:8]}"
    return request.getfixturevalue("s3") + "/prefix"


def test_write_read_list_delete_round_trip(root):
    st = Storage(root)
    st.write_bytes("a/one.bin", b"\x00\x01" * 1000)
    st.write_text("a/two.txt", "hello")
    st.write_text("b/c/three.txt", "deep")
    assert st.read_bytes("a/one.bin") == b"\x00\x01" * 1000
    assert st.read_text("a/two.txt") == "hello"
    assert st.list("a") == ["one.bin", "two.txt"]
    assert sorted(st.walk_files()) == ["a/one.bin", "a/two.txt", "b/c/three.txt"]
    assert st.size("a/one.bin") == 2000
    with st.open_read("a/one.bin") as f:
        f.seek(1000)
        assert f.read(4) == b"\x00\x01\x00\x01"
    st.delete("a", recursive=True)
    assert not st.exists("a/one.bin")
    assert st.list("a") == []


def test_overwrite_replaces_whole_object(root):
    st = Storage(root)
    st.write_bytes("x", b"old" * 10)
    st.write_bytes("x", b"new")
    assert st.read_bytes("x") == b"new"


def test_missing_object_error_names_the_url(root):
    st = Storage(root)
    with pytest.raises(StorageError, match="not found: .*missing.bin"):
        st.read_bytes("missing.bin")


def test_upload_and_download_files(root, tmp_path):
    st = Storage(root)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    st.write_from_file("up/src.bin", str(src))
    dst = tmp_path / "dl" / "dst.bin"
    st.download("up/src.bin", str(dst))
    assert dst.read_bytes() == src.read_bytes()


def test_local_readers_never_see_a_partial_file(tmp_path):
    st = Storage(str(tmp_path))
    big_a, big_b = b"a" * 4_000_000, b"b" * 4_000_000
    st.write_bytes("f", big_a)
    seen: set[int] = set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            data = st.read_bytes("f")
            seen.add(len(data))
            assert data in (big_a, big_b)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(20):
        st.write_bytes("f", big_b if i % 2 else big_a)
    stop.set()
    t.join()
    assert seen == {4_000_000}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_crash_before_publish_leaves_previous_version(tmp_path, monkeypatch):
    st = Storage(str(tmp_path))
    st.write_bytes("f", b"committed")

    def boom(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        st.write_bytes("f", b"half-written")
    monkeypatch.undo()
    assert st.read_bytes("f") == b"committed"
    assert st.list() == ["f"]   # the orphaned temporary is hidden from listings


@pytest.mark.parametrize("url,reason", [
    ("ftp://host/x", "unsupported URL scheme 'ftp'"),
    ("s3://", "no bucket"),
    ("", "non-empty"),
    ("hdfs://nn/x", "unsupported URL scheme 'hdfs'"),
])
def test_bad_urls_are_rejected_before_any_io(url, reason):
    with pytest.raises(StorageError, match=reason):
        Storage(url)


def test_s3_endpoint_from_spec_options_wins_over_environment(s3_endpoint, monkeypatch):
    bucket = s3_endpoint.make_bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    st = Storage(f"s3://{bucket}", {"endpoint_url": s3_endpoint.url})
    st.write_text("k", "v")
    assert st.read_text("k") == "v"


def test_credentials_are_never_rendered(s3_endpoint, caplog):
    opts = {"endpoint_url": s3_endpoint.url, "key": "AKIASECRETKEY", "secret": "sup3rs3cret"}
    st = Storage(f"s3://{s3_endpoint.make_bucket()}", opts)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("storage is %r", st)
    text = repr(st) + caplog.text + str(storage.redact(opts))
    assert "sup3rs3cret" not in text and "AKIASECRETKEY" not in text
    assert s3_endpoint.url in text


def test_storage_pickles_for_ray_workers(tmp_path):
    import pickle
    st = Storage(str(tmp_path), {"anon": False})
    st2 = pickle.loads(pickle.dumps(st))
    st.write_text("a", "1")
    assert st2.read_text("a") == "1"


def test_an_object_replaced_while_it_is_read_is_read_again(tmp_path, monkeypatch):
    """s3fs pins an object's version when it opens it; a writer replacing it before the read
    makes the read fail with FileExpired (EBUSY). The new version is read instead."""
    import errno

    st = Storage(str(tmp_path))
    st.write_text("rec.json", '{"v": 2}')
    real_open, calls = st.fs.open, []

    def flaky_open(path, mode="rb", **kw):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.EBUSY, "the remote file no longer exists")
        return real_open(path, mode, **kw)
    monkeypatch.setattr(st.fs, "open", flaky_open)
    assert st.read_text("rec.json") == '{"v": 2}' and len(calls) == 2


# resolve: one canonical form per URL, computed when a spec is validated ---------------------------
@pytest.mark.parametrize("url,expected", [
    ("data/x", "{cwd}/data/x"),
    ("./data/../x/", "{cwd}/x"),
    ("~/data", "{home}/data"),
    ("/abs/path/", "/abs/path"),
    ("file:///abs/path", "/abs/path"),
    ("file://rel/path", "{cwd}/rel/path"),
    ("s3://bucket/prefix/", "s3://bucket/prefix"),
    ("S3://bucket", "s3://bucket"),
    ("memory://r/", "memory://r"),
    ("gs://b/k", "gs://b/k"),
])
def test_resolve_gives_absolute_local_paths_and_remote_urls_unchanged(url, expected, tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    want = expected.format(cwd=str(tmp_path), home=os.path.expanduser("~"))
    assert storage.resolve(url) == want
    assert storage.resolve(want) == want          # idempotent: a stored spec resolves to itself
    assert storage.is_local(url) == (not storage.has_scheme(want))
    assert storage.local_path(url) == (want if storage.is_local(url) else None)


@pytest.mark.parametrize("url", ["ftp://h/x", "s3://", "", "file://"])
def test_resolve_rejects_what_check_url_rejects(url):
    with pytest.raises(StorageError):
        storage.resolve(url)


def test_basename_parent_and_whole_url_reads(tmp_path, monkeypatch):
    assert storage.basename("s3://b/ckpt/step-1/") == "step-1"
    assert storage.parent("s3://b/ckpt/step-1") == "s3://b/ckpt"
    monkeypatch.chdir(tmp_path)
    assert storage.basename("file://a/b.yaml") == "b.yaml"
    assert storage.parent("b.yaml") == str(tmp_path)
    (tmp_path / "b.yaml").write_text("k: v")
    assert storage.read_text("b.yaml") == storage.read_text(f"file://{tmp_path}/b.yaml") == "k: v"
    assert Storage("sub/").root == str(tmp_path / "sub")


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_every_atomic_write_cleans_up_its_temporary_on_failure(kind, tmp_path):
    root = str(tmp_path / "r") if kind == "local" else f"memory://atomic-{uuid.uuid4().hex[:8]}"
    st = Storage(root)
    st.write_text("f", "committed")
    with pytest.raises(RuntimeError), st.open_atomic("f") as f:
        f.write(b"half")
        raise RuntimeError("writer failed")
    with pytest.raises(FileNotFoundError):
        st.write_from_file("f", str(tmp_path / "no-such-source"))
    with pytest.raises(StorageError):
        st.download("missing", str(tmp_path / "dl" / "x"))
    assert st.read_text("f") == "committed"
    assert [p.rsplit("/", 1)[-1] for p in st.fs.find(st.root_path)] == ["f"]  # no .tmp-* left
    assert not (tmp_path / "dl").exists() or os.listdir(tmp_path / "dl") == []


# no module but this one looks at a URL's scheme (DESIGN invariant 2) ----------------------------
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (file, literal): "://" literals that are not about storage
_NOT_STORAGE = {
    ("orchestrator/ray_adapter.py", "://"): "a Ray address (ray://, http://) is not a storage URL",
    ("orchestrator/store.py", "://"): "the job store's SQLAlchemy database URL",
    ("orchestrator/store.py", "sqlite:///"): "the job store's SQLAlchemy database URL",
    ("orchestrator/store.py", "sqlite:///:memory:"): "the job store's SQLAlchemy database URL",
    ("orchestrator/store.py", "postgresql+psycopg://"): "the job store's SQLAlchemy database URL (psycopg 3)",
}


def _scheme_literals(path: str):
    """(line, text) of every string literal with "://" in it that is not a docstring, an argparse
    ``help=`` / pydantic ``description=``, or an http(s) address; and every use of ``scheme_of``."""
    import ast
    tree = ast.parse(open(path).read(), path)
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and \
                node.body and isinstance(node.body[0], ast.Expr):
            skip.add(id(node.body[0].value))
        if isinstance(node, ast.keyword) and node.arg in ("help", "description"):
            skip.update(id(n) for n in ast.walk(node.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "://" in node.value \
                and id(node) not in skip and not node.value.startswith(("http://", "https://")):
            yield node.lineno, node.value
        elif (isinstance(node, ast.Name) and node.id == "scheme_of") or \
                (isinstance(node, ast.Attribute) and node.attr == "scheme_of"):
            yield node.lineno, "scheme_of"


def test_no_module_outside_storage_branches_on_a_url_scheme():
    bad = []
    for top in ("orchestrator", "actors", "jobs"):
        for dirpath, _, names in os.walk(os.path.join(_ROOT, top)):
            for n in names:
                rel = os.path.relpath(os.path.join(dirpath, n), _ROOT)
                if not n.endswith(".py") or rel == "orchestrator/storage.py":
                    continue
                bad += [f"{rel}:{line}: {text!r}" for line, text in _scheme_literals(os.path.join(_ROOT, rel))
                        if (rel, text) not in _NOT_STORAGE]
    assert not bad, "URL scheme handled outside orchestrator/storage.py (ask storage.resolve, " \
                    "is_local, local_path, basename, parent, has_scheme):\n" + "\n".join(bad)
