"""A byte-counting TCP proxy in front of an S3 endpoint on loopback.

Each simulated node (or each contender) talks to the endpoint through its own proxy port, so the
bytes it downloaded are counted on the wire, the same way for every loader whatever its client
library: ``CountingProxy(target_port).downloaded`` is what the endpoint sent through it (HTTP
framing included, a few hundred bytes per request).

``python -m bench.data.s3proxy --target PORT --counter FILE`` runs one in a process of its own
(so relaying costs the measured loader no CPU time of its process), prints its URL, and keeps the
byte count in the first 8 bytes of FILE (:func:`read_counter`).
"""

from __future__ import annotations

import argparse
import mmap
import os
import socket
import struct
import sys
import threading


class CountingProxy:
    """Listens on 127.0.0.1 (a free port) and forwards every connection to ``127.0.0.1:target``."""

    def __init__(self, target_port: int, counter: mmap.mmap | None = None):
        self.target = ("127.0.0.1", target_port)
        self._counter = counter
        self.downloaded = 0
        self.uploaded = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="s3proxy-accept").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                dst.sendall(data)
                with self._lock:
                    if down:
                        self.downloaded += len(data)
                        if self._counter is not None:
                            struct.pack_into("<q", self._counter, 0, self.downloaded)
                    else:
                        self.uploaded += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def reset(self) -> None:
        with self._lock:
            self.downloaded = self.uploaded = self.connections = 0

    def close(self) -> None:
        self._closed = True
        self._sock.close()


def read_counter(path: str) -> int:
    """Bytes downloaded so far through the proxy process that keeps its count in ``path``."""
    with open(path, "rb") as f:
        return struct.unpack("<q", f.read(8))[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--target", type=int, required=True, help="port of the S3 endpoint on 127.0.0.1")
    p.add_argument("--counter", required=True, help="file whose first 8 bytes hold the count")
    a = p.parse_args(argv)
    with open(a.counter, "wb") as f:
        f.write(b"\0" * 8)
    fd = os.open(a.counter, os.O_RDWR)
    counter = mmap.mmap(fd, 8)
    proxy = CountingProxy(a.target, counter)
    print(proxy.url, flush=True)
    threading.Event().wait()  # until killed
    return 0


if __name__ == "__main__":
    sys.exit(main())
