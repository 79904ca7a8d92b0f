"""A byte-counting TCP proxy in front of an S3 endpoint on loopback.

Each simulated node (or each contender) talks to the endpoint through its own proxy port, so the
bytes it downloaded are counted on the wire, the same way for every loader whatever its client
library: ``CountingProxy(target_port).downloaded`` is what the endpoint sent through it (HTTP
framing included, a few hundred bytes per request).
"""

from __future__ import annotations

import socket
import threading


class CountingProxy:
    """Listens on 127.0.0.1 (a free port) and forwards every connection to ``127.0.0.1:target``."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.downloaded = 0
        self.uploaded = 0
        self.requests = 0
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
                self.requests += 1
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
            self.downloaded = self.uploaded = self.requests = 0

    def close(self) -> None:
        self._closed = True
        self._sock.close()
