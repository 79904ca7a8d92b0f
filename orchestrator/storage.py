"""Every read and write the system makes goes through this module (DESIGN invariant 2).

A location is an fsspec URL: a plain path, ``file://``, ``s3://`` (s3fs) or ``memory://``.
Nothing outside this module looks at the scheme: callers ask :func:`is_local`, :func:`local_path`,
:func:`basename`, :func:`parent`, :func:`has_scheme`.

A URL is put in canonical form once, by :func:`resolve`, when a spec is validated (every storage
field of a spec goes through it): a local location becomes an absolute plain path (``~`` expanded,
a relative path resolved against the current working directory, ``file://`` dropped), so the spec
means the same thing in every process and on every node that reads it; a remote URL keeps its
form, less trailing slashes. :class:`Storage` resolves its root the same way.

S3 endpoint and credentials come from ``storage_options`` (e.g. a spec's ``storage`` block) or
from the environment (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``). Credentials are never
logged: :func:`redact` is the only way options are ever rendered.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import posixpath
import uuid
from typing import Any, BinaryIO, Iterator

import fsspec

SUPPORTED_SCHEMES = ("file", "s3", "memory", "gs", "gcs")
_SECRET_KEYS = {"key", "secret", "token", "aws_secret_access_key", "aws_access_key_id",
                "aws_session_token", "password"}


class StorageError(ValueError):
    """A URL cannot be used: bad scheme, missing object, or an I/O failure (message names the URL)."""


def scheme_of(url: str) -> str:
    """The URL's scheme; a plain path is ``file``."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


def check_url(url: str) -> str:
    """Validate a storage URL without touching storage. Returns it unchanged; raises StorageError."""
    if not isinstance(url, str) or not url.strip():
        raise StorageError("storage URL must be a non-empty string")
    scheme = scheme_of(url)
    if scheme not in SUPPORTED_SCHEMES:
        raise StorageError(
            f"unsupported URL scheme {scheme!r} in {url!r}; use one of "
            f"{', '.join(s + '://' for s in SUPPORTED_SCHEMES)} or a plain path")
    if scheme in ("s3", "gs", "gcs"):
        rest = url.split("://", 1)[1]
        if not rest or rest.startswith("/"):
            raise StorageError(f"{url!r} has no bucket name")
    return url


def resolve(url: str) -> str:
    """The canonical form of a storage URL (validated as :func:`check_url` does). Idempotent.

    Local (a plain path or ``file://``): an absolute, normalised plain path, ``~`` expanded and a
    relative path resolved against the current working directory (plain paths, not ``file://``
    URLs, because that is what users write and what OS calls take). Remote (``s3://``, ``gs://``,
    ``memory://``...): unchanged but for a lower-case scheme and no trailing ``/``.
    """
    check_url(url)
    scheme = scheme_of(url)
    if scheme == "file":
        path = url.split("://", 1)[1] if "://" in url else url
        if not path.strip():
            raise StorageError(f"{url!r} names no path")
        return os.path.abspath(os.path.expanduser(path))
    rest = url.split("://", 1)[1].rstrip("/")
    return f"{scheme}://{rest}"


def has_scheme(text: str) -> bool:
    """Whether ``text`` is spelt as a URL with a scheme (``s3://b/k``, ``file:///x``), not a path."""
    return "://" in text


def is_local(url: str) -> bool:
    """Whether the URL is on the local filesystem (a plain path or ``file://``)."""
    return scheme_of(url) == "file"


def local_path(url: str) -> str | None:
    """The absolute OS path of a local URL; None for any other."""
    return resolve(url) if is_local(url) else None


def basename(url: str) -> str:
    """The last component of the URL's path (``s3://b/ckpt/step-1/`` -> ``step-1``)."""
    return os.path.basename(resolve(url)) if is_local(url) else \
        posixpath.basename(url.split("://", 1)[1].rstrip("/"))


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """One object named by its full URL (a path or any supported URL)."""
    url = resolve(url)
    return Storage(parent(url), storage_options).read_bytes(basename(url))


def read_text(url: str, storage_options: dict[str, Any] | None = None) -> str:
    return read_bytes(url, storage_options).decode("utf-8")


def _env_s3_options() -> dict[str, Any]:
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    return opts


def filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """Return ``(fs, path)`` for a URL. Explicit options win over the environment."""
    check_url(url)
    scheme = scheme_of(url)
    opts: dict[str, Any] = {}
    if scheme == "s3":
        opts.update(_env_s3_options())
        # s3fs caches directory listings; we write and list in the same process, so keep it off.
        opts.setdefault("use_listings_cache", False)
    for k, v in (storage_options or {}).items():
        if k == "client_kwargs" and isinstance(v, dict):
            opts.setdefault("client_kwargs", {}).update(v)
        elif k == "endpoint_url":
            opts.setdefault("client_kwargs", {})["endpoint_url"] = v
        else:
            opts[k] = v
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path


def redact(options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of storage options safe to print or log."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif k.lower() in _SECRET_KEYS:
            out[k] = "***"
        else:
            out[k] = v
    return out


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with ``/`` (local paths too; fsspec accepts them)."""
    out = url.rstrip("/")
    for p in parts:
        out = out + "/" + str(p).strip("/")
    return out


def parent(url: str) -> str:
    """The URL one level up (a local one resolved first: ``parent("a.yaml")`` is the cwd)."""
    if is_local(url):
        return os.path.dirname(resolve(url))
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"


@contextlib.contextmanager
def _atomic(target: str, fsync: bool = False, fs=None) -> Iterator[str]:
    """The one write-then-rename: yields a hidden temporary path beside ``target`` to write the new
    content to. When the block exits cleanly the temporary is renamed onto ``target`` (after an
    fsync of the file when ``fsync``); on any error it is removed and the error propagates, so
    ``target`` holds the old content or the whole new one, never a prefix.

    ``fs`` None: ``target`` is an OS path (created parents, ``os.replace``, atomic on POSIX);
    otherwise an fsspec filesystem with no atomic write of its own (memory), renamed by ``fs.mv``.
    Object stores need neither: a single PUT or a completed multipart upload is atomic already.
    """
    parent_dir, name = (os.path.split(target) if fs is None else posixpath.split(target))
    tmp = f"{parent_dir}/.tmp-{uuid.uuid4().hex}-{name}"
    if fs is None:
        os.makedirs(parent_dir, exist_ok=True)
    try:
        yield tmp
        if fs is None:
            if fsync:
                _fsync_path(tmp)
            os.replace(tmp, target)
        else:
            fs.mv(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            if fs is None:
                os.unlink(tmp)
            else:
                fs.rm_file(tmp)
        raise


class Storage:
    """A root URL plus options; all paths given to methods are relative to the root.

    ``Storage("s3://bucket/prefix").write_bytes("a/b.bin", data)`` writes ``s3://bucket/prefix/a/b.bin``.
    """

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        self.root = resolve(root)
        self.options = dict(storage_options or {})
        self.fs, self.root_path = filesystem(self.root, self.options)
        self.scheme = scheme_of(self.root)

    def __repr__(self) -> str:
        return f"Storage({self.root!r}, options={redact(self.options)!r})"

    def __reduce__(self):  # picklable across Ray workers: rebuild the filesystem there
        return (Storage, (self.root, self.options))

    # paths -----------------------------------------------------------------------------------
    def url(self, rel: str = "") -> str:
        return join(self.root, rel) if rel else self.root

    def _p(self, rel: str) -> str:
        rel = rel.strip("/")
        return f"{self.root_path.rstrip('/')}/{rel}" if rel else self.root_path

    def sub(self, rel: str) -> "Storage":
        return Storage(self.url(rel), self.options)

    # reads -----------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return bool(self.fs.exists(self._p(rel)))

    def read_bytes(self, rel: str) -> bytes:
        """The whole object. On an object store a writer may replace it between the open (which
        pins its version) and the read: then the new version is read (a few tries)."""
        for attempt in range(3):
            try:
                with self.fs.open(self._p(rel), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                raise StorageError(f"not found: {self.url(rel)}") from None
            except OSError as e:
                if not _replaced_while_read(e) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open_read(self, rel: str, block_size: int | None = None, size: int | None = None):
        """A seekable binary file object (random access by range requests on object stores).
        ``size``, when the caller knows it, saves an object store the request that asks for it."""
        kw: dict[str, Any] = {}
        if self.scheme != "file":
            kw.update({"block_size": block_size} if block_size else {}, **({"size": size} if size else {}))
        try:
            return self.fs.open(self._p(rel), "rb", **kw)
        except FileNotFoundError:
            raise StorageError(f"not found: {self.url(rel)}") from None

    def size(self, rel: str) -> int:
        try:
            return int(self.fs.size(self._p(rel)))
        except FileNotFoundError:
            raise StorageError(f"not found: {self.url(rel)}") from None

    def list(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""
        p = self._p(rel)
        try:
            entries = self.fs.ls(p, detail=False, refresh=True) if self.scheme == "s3" else \
                self.fs.ls(p, detail=False)
        except FileNotFoundError:
            return []
        names = []
        for e in entries:
            name = posixpath.basename(str(e).rstrip("/"))
            if name and not name.startswith(".tmp-"):
                names.append(name)
        return sorted(set(names))

    def walk_files(self, rel: str = "") -> Iterator[str]:
        """Relative paths of every file below ``rel`` (temporaries excluded)."""
        base = self._p(rel).rstrip("/")
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return
        prefix = rel.strip("/")
        for f in sorted(str(x) for x in found):
            if not f.startswith(base):
                continue
            r = f[len(base):].lstrip("/")
            if r and not posixpath.basename(r).startswith(".tmp-"):
                yield f"{prefix}/{r}" if prefix else r

    # writes ----------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes, fsync: bool = True) -> None:
        """Atomic: readers see either the old object or the whole new one, never a prefix.

        Local and memory filesystems write a hidden temporary beside the target, then rename;
        object stores publish a single PUT (or a completed multipart upload) atomically. ``fsync``
        (local files) makes the bytes durable before the rename; without it they are published from
        the page cache, safe against a killed process but not a lost machine (see :meth:`sync`).
        """
        target = self._p(rel)
        if self.scheme == "file":
            with _atomic(target, fsync=fsync) as tmp, open(tmp, "wb") as f:
                f.write(data)
        elif self.scheme == "memory":
            with _atomic(target, fs=self.fs) as tmp:
                self.fs.pipe_file(tmp, data)
        else:
            self.fs.pipe_file(target, data)

    def write_text(self, rel: str, text: str, fsync: bool = True) -> None:
        self.write_bytes(rel, text.encode("utf-8"), fsync=fsync)

    @contextlib.contextmanager
    def open_atomic(self, rel: str) -> Iterator[BinaryIO]:
        """A binary file to stream into; published atomically when the block exits cleanly.

        Local files go to a hidden temporary renamed into place (no fsync: see :meth:`sync`);
        object stores upload as the file is written (multipart) and publish on close, and an
        exception aborts the upload, so nothing partial is ever visible at ``rel``.
        """
        target = self._p(rel)
        if self.scheme == "file":
            with _atomic(target) as tmp, open(tmp, "wb") as f:
                yield f
            return
        if self.scheme == "memory":
            with _atomic(target, fs=self.fs) as tmp, self.fs.open(tmp, "wb") as f:
                yield f
            return
        f = self.fs.open(target, "wb")
        try:
            yield f
        except BaseException:
            discard = getattr(f, "discard", None)
            if discard is not None:
                discard()       # aborts the multipart upload
                f.closed = True  # so the garbage collector does not try to publish the remains
            raise
        f.close()

    def sync(self, rel: str = "") -> None:
        """Make every file under ``rel`` (and the directory entries) durable on local disk.

        A no-op for object stores and memory, where a completed write is already durable or
        durability does not apply.
        """
        if self.scheme != "file":
            return
        base = self._p(rel)
        files, dirs = [], []
        for dirpath, _, names in os.walk(base):
            files += [os.path.join(dirpath, n) for n in names]
            dirs.append(dirpath)
        # all at once: the filesystem commits concurrent fsyncs together (one journal commit for
        # the lot, not one per small file), then the directory entries, deepest first
        if len(files) > 1:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
                list(pool.map(_fsync_path, files))
        else:
            for f in files:
                _fsync_path(f)
        for d in reversed(dirs):
            _fsync_path(d)

    def write_from_file(self, rel: str, local_path: str) -> None:
        """Upload a local file atomically (streaming; no full copy in memory for object stores)."""
        target = self._p(rel)
        if self.scheme == "file":
            import shutil
            with _atomic(target) as tmp:
                shutil.copyfile(local_path, tmp)
        elif self.scheme == "memory":
            with _atomic(target, fs=self.fs) as tmp:
                self.fs.put_file(local_path, tmp)
        else:
            self.fs.put_file(local_path, target)

    def download(self, rel: str, local_path: str) -> None:
        """Copy an object to a local file (atomic on the local side)."""
        try:
            with _atomic(os.path.abspath(local_path)) as tmp:
                self.fs.get_file(self._p(rel), tmp)
        except FileNotFoundError:
            raise StorageError(f"not found: {self.url(rel)}") from None

    def delete(self, rel: str, recursive: bool = False) -> None:
        p = self._p(rel)
        try:
            if recursive:
                self.fs.rm(p, recursive=True)
            else:
                self.fs.rm_file(p)
        except FileNotFoundError:
            pass

    def pyarrow_filesystem(self):
        """This storage as a ``pyarrow.fs.FileSystem`` (for Ray Train's ``storage_filesystem``)."""
        import pyarrow.fs
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(self.fs))

    def pyarrow_path(self, rel: str = "") -> str:
        """The scheme-less path matching :meth:`pyarrow_filesystem`."""
        return self._p(rel)

    def local_path(self, rel: str = "") -> str | None:
        """The OS path when the storage is the local filesystem (for memory-mapping), else None."""
        return self._p(rel) if self.scheme == "file" else None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(fobj: io.BufferedIOBase, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    while True:
        b = fobj.read(chunk)
        if not b:
            return h.hexdigest()
        h.update(b)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replaced_while_read(e: OSError) -> bool:
    """s3fs's FileExpired (errno EBUSY): the object changed under an open reader."""
    return e.errno == errno.EBUSY or type(e).__name__ == "FileExpired"
