"""The wire between the evaluator and a worker: a JSON header plus raw tensor bytes, over a pipe.

Never pickle: the worker runs untrusted code, and unpickling its bytes would run code in the judge.
A message is ``[u32 header length][header JSON][tensor bytes …]``; the header lists each tensor's
name, dtype (from a fixed allowlist), shape and byte count, and the reader checks all of them.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
           "bool": torch.bool}
MAX_HEADER = 64 << 20
MAX_TOTAL = 16 << 30


class ProtocolError(Exception):
    """The other side sent something that is not a well-formed message (or went away)."""


class Timeout(Exception):
    """No complete message arrived before the deadline."""


def _dtype_name(dt: torch.dtype) -> str:
    name = str(dt).removeprefix("torch.")
    if name not in _DTYPES:
        raise ProtocolError(f"tensor dtype {dt} cannot cross the wire")
    return name


def encode(header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> list[bytes | memoryview]:
    tensors = tensors or {}
    metas = []
    blobs: list[bytes | memoryview] = []
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        buf = memoryview(raw.numpy())
        metas.append({"name": name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape), "nbytes": buf.nbytes})
        blobs.append(buf)
    head = json.dumps({**header, "_tensors": metas}, allow_nan=True).encode()
    return [struct.pack("<I", len(head)), head, *blobs]


def send(fd: int, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
    for part in encode(header, tensors):
        view = memoryview(part).cast("B")
        while view.nbytes:
            n = os.write(fd, view)
            view = view[n:]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout()
            r, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not r:
                continue
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise ProtocolError("the worker closed the connection")
        got += k
    return buf


def recv(fd: int, deadline: float | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read one message. ``deadline`` is a time.monotonic() value; raises Timeout past it."""
    (hlen,) = struct.unpack("<I", bytes(_read_exact(fd, 4, deadline)))
    if hlen > MAX_HEADER:
        raise ProtocolError(f"message header of {hlen} bytes is over the {MAX_HEADER} limit")
    try:
        header = json.loads(bytes(_read_exact(fd, hlen, deadline)))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"message header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("message header is not a JSON object")
    metas = header.pop("_tensors", [])
    if not isinstance(metas, list):
        raise ProtocolError("message tensor list is malformed")
    total = 0
    tensors: dict[str, torch.Tensor] = {}
    for m in metas:
        try:
            name, dtype, shape, nbytes = str(m["name"]), _DTYPES[m["dtype"]], [int(s) for s in m["shape"]], int(m["nbytes"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"malformed tensor entry {str(m)[:200]}") from None
        if any(s < 0 for s in shape):
            raise ProtocolError(f"tensor {name}: negative dimension in {shape}")
        expect = dtype.itemsize
        for s in shape:
            expect *= s
        if nbytes != expect:
            raise ProtocolError(f"tensor {name}: {nbytes} bytes for shape {shape} of {dtype}")
        total += nbytes
        if total > MAX_TOTAL:
            raise ProtocolError("message is larger than the 16 GiB limit")
        raw = _read_exact(fd, nbytes, deadline)
        if nbytes:
            t = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)
        else:
            t = torch.empty(shape, dtype=dtype)
        tensors[name] = t
    return header, tensors
