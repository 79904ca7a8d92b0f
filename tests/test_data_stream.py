"""The loader actor's row stream without Ray: token check, answers in request order, errors
raised on the trainer's side, and a restarted server answering every request still waiting."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from actors.data import ShardError
from actors.data.store import BufferPool
from actors.data.stream import StreamClient, StreamServer

COLUMNS = [("id", np.dtype("int64"), ()), ("x", np.dtype("uint8"), (16,))]


def _rows(ids, step, first):
    if (ids < 0).any():
        raise ShardError("shard 9 (file:///x/shard-00009.arrow) is missing")
    return {"x": np.repeat(ids.astype(np.uint8)[:, None], 16, axis=1), "id": ids * 10}


def _client(server, connections=2):
    return StreamClient(lambda: (*server.address, server.token), COLUMNS, BufferPool(8), connections)


def test_requests_are_answered_in_order_with_every_column():
    server = StreamServer("127.0.0.1", _rows, ["id", "x"])
    client = _client(server)
    futs = [client.submit(np.arange(i, i + 50), i, i) for i in range(20)]
    for i, f in enumerate(futs):
        out = f.result(timeout=10)
        assert np.array_equal(out["id"], np.arange(i, i + 50) * 10)
        assert out["x"].shape == (50, 16) and np.array_equal(out["x"][:, 3], np.arange(i, i + 50).astype(np.uint8))
    client.close()
    server.close()


def test_a_connection_without_the_token_gets_nothing():
    server = StreamServer("127.0.0.1", _rows, ["id", "x"])
    with socket.create_connection(server.address, timeout=5) as s:
        s.sendall(b"\0" * 16 + np.array([1, -1, -1, 5], np.int64).tobytes())
        try:
            answer = s.recv(1)
        except ConnectionResetError:  # closed with the request unread
            answer = b""
        assert answer == b""
    server.close()


def test_an_error_in_the_actor_is_raised_to_the_trainer_with_its_type():
    server = StreamServer("127.0.0.1", _rows, ["id", "x"])
    client = _client(server)
    with pytest.raises(ShardError, match=r"shard 9 .* is missing"):
        client.submit(np.array([1, -1]), 0, 0).result(timeout=10)
    assert client.submit(np.array([3]), 1, 1).result(timeout=10)["id"].tolist() == [30]  # the stream goes on
    client.close()
    server.close()


def test_requests_waiting_when_the_server_dies_are_answered_by_its_restart():
    go = threading.Event()

    def slow(ids, step, first):
        go.wait(10)
        return _rows(ids, step, first)

    first = StreamServer("127.0.0.1", slow, ["id", "x"])
    current = [first]
    client = StreamClient(lambda: (*current[0].address, current[0].token), COLUMNS, BufferPool(8), 1)
    futs = [client.submit(np.arange(i, i + 5), i, i) for i in range(4)]
    current[0] = StreamServer("127.0.0.1", _rows, ["id", "x"])  # the restarted actor, elsewhere
    first.close()
    client._conns[0].sock.shutdown(socket.SHUT_RDWR)  # the old process's connection breaks
    go.set()
    for i, f in enumerate(futs):
        assert f.result(timeout=10)["id"].tolist() == list(range(i * 10, (i + 5) * 10, 10))
    client.close()
    current[0].close()


def test_when_the_actor_cannot_be_found_again_every_waiter_and_later_request_fails():
    server = StreamServer("127.0.0.1", _rows, ["id", "x"])
    calls = []

    def address():
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("actor died for good")
        return (*server.address, server.token)

    client = StreamClient(address, COLUMNS, BufferPool(8), 1)
    assert client.submit(np.array([2]), 0, 0).result(timeout=10)["id"].tolist() == [20]
    client._conns[0].sock.shutdown(socket.SHUT_RDWR)
    client._conns[0].thread.join(10)
    with pytest.raises(RuntimeError, match="died for good"):
        client.submit(np.array([2]), 1, 1)
    client.close()
    server.close()


def test_a_server_on_an_ipv6_address_is_reached():
    try:
        server = StreamServer("::1", _rows, ["id", "x"])
    except OSError:
        pytest.skip("no IPv6 loopback here")
    client = _client(server, 1)
    assert client.submit(np.array([4]), 0, 0).result(timeout=10)["id"].tolist() == [40]
    client.close()
    server.close()
