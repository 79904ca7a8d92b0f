"""Validation of prediction requests, pure and testable without Serve.

A request is a JSON object ``{"inputs": [example, ...]}`` where each example has the spec's
``input_shape`` and dtype, sent with ``Content-Type: application/json`` (or none). Every rejection
is a :class:`RequestError` carrying an HTTP 4xx status and a message that says what was expected
and what arrived; nothing here can raise anything else. :func:`read_body` refuses a body from its
headers before reading it where they already say it cannot be one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import dataclass

import numpy as np
import orjson

_DTYPES = {"float32": np.float32, "int64": np.int64}
_ACCEPTED_KINDS = {"float32": "iuf", "int64": "iu"}
# Upper bound on one number's JSON text (sign, 17 digits, exponent, separator, spaces).
_BYTES_PER_NUMBER = 32


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class InputSchema:
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    max_request_examples: int = 256

    @property
    def max_body_bytes(self) -> int:
        """Largest body worth parsing: the biggest allowed request plus slack for brackets."""
        per_example = math.prod(self.input_shape) * _BYTES_PER_NUMBER + 8 * len(self.input_shape)
        return self.max_request_examples * per_example + 4096


def _reject_constant(name: str):
    raise RequestError(400, f"non-finite number {name} is not allowed in inputs")


def _too_large(size: str, schema: InputSchema) -> RequestError:
    return RequestError(413, f"request body is {size} bytes; the limit is {schema.max_body_bytes} "
                             f"(at most {schema.max_request_examples} examples)")


def check_content_type(headers) -> None:
    """Accept ``application/json`` (with any parameters, such as ``charset=utf-8``), a ``+json``
    type, or no Content-Type at all (read as JSON: minimal clients send none).

    Raises RequestError(415) for any other type, saying which header to send.
    """
    value = (headers.get("content-type") or "").strip()
    mime = value.split(";", 1)[0].strip().lower()
    if not mime or mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json")):
        return
    raise RequestError(415, f"Content-Type {value!r} is not JSON: send 'Content-Type: application/json' "
                            "(curl: --json, or -H 'Content-Type: application/json'; -d alone sends "
                            "application/x-www-form-urlencoded)")


async def read_body(request, schema: InputSchema) -> bytes:
    """The body of ``request`` (a Starlette ``Request``: ``headers`` and async ``stream()``),
    read only as far as the limit (``schema.max_body_bytes``).

    Raises RequestError before reading anything: 415 for a type that is not JSON
    (:func:`check_content_type`), 400 for a Content-Length that is not a byte count, 413 when the
    Content-Length is over the limit. A body without Content-Length (chunked) is read chunk by
    chunk and refused with 413 as soon as it passes the limit; the rest is never read.
    """
    headers = request.headers
    check_content_type(headers)
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, f"Content-Length {declared!r} is not a byte count")
        if int(declared) > schema.max_body_bytes:
            raise _too_large(declared.strip(), schema)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > schema.max_body_bytes:
            raise _too_large(f"over {size}", schema)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_inputs(body: bytes, schema: InputSchema) -> np.ndarray:
    """Decode and check a request body; returns an array ``[n, *input_shape]`` of the dtype.

    Raises RequestError: 413 for too large a body or more than ``max_request_examples``
    examples, 400 for malformed JSON, a missing ``inputs`` list, a wrong shape or a wrong dtype.
    """
    if len(body) > schema.max_body_bytes:
        raise _too_large(str(len(body)), schema)
    try:
        payload = orjson.loads(body)  # ~12x faster than json for a list of floats
    except orjson.JSONDecodeError:
        # orjson refuses some JSON the standard parser reads (integers beyond 64 bits) and says
        # less about what is wrong (NaN, Infinity): the standard parser decides and explains.
        try:
            payload = json.loads(body, parse_constant=_reject_constant)
        except RequestError:
            raise
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise RequestError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise RequestError(400, 'body must be a JSON object {"inputs": [example, ...]}')
    inputs = payload["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, '"inputs" must be a non-empty list of examples')
    n = len(inputs)
    if n > schema.max_request_examples:
        raise RequestError(413, f"{n} examples in one request; the limit is {schema.max_request_examples}")
    want = [n, *schema.input_shape]
    try:
        arr = np.asarray(inputs)
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise RequestError(400, f"inputs must be a rectangular array of shape {want}: {e}") from None
    if list(arr.shape) != want:
        raise RequestError(400, f"inputs have shape {list(arr.shape)}; expected {want} "
                                f"(n examples of shape {list(schema.input_shape)})")
    if arr.dtype.kind not in _ACCEPTED_KINDS[schema.input_dtype]:
        got = {"b": "booleans", "U": "strings", "O": "null or mixed values", "f": "floats"}.get(
            arr.dtype.kind, str(arr.dtype))
        raise RequestError(400, f"inputs must be {schema.input_dtype} numbers; got {got}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise RequestError(400, "inputs do not fit int64")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise RequestError(400, "inputs must be finite numbers")
    with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
        out = arr.astype(_DTYPES[schema.input_dtype], copy=False)
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise RequestError(400, "inputs overflow float32")
    return out


def api_key_digest(key: str) -> str:
    """What the deployment stores instead of the key itself."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_api_key(headers, key_digest: str | None) -> None:
    """Accept ``Authorization: Bearer KEY`` or ``x-api-key: KEY``; no-op when ``key_digest`` is None.

    Raises RequestError(401) when the key is missing or wrong (compared in constant time).
    """
    if key_digest is None:
        return
    given = headers.get("x-api-key")
    auth = headers.get("authorization") or ""
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if not given:
        raise RequestError(401, "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
    if not hmac.compare_digest(api_key_digest(given), key_digest):
        raise RequestError(401, "invalid API key")
