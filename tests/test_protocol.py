"""The wire: exact round trips, and malformed messages refused without unpickling anything."""

from __future__ import annotations

import os
import struct

import pytest
import torch

from kerneltune.evaluate import protocol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_roundtrip(dtype):
    r, w = os.pipe()
    t = (torch.randn(3, 5, 7) * 10).to(dtype)
    protocol.send(w, {"cmd": "x", "n": 1}, {"a": t, "scalar": torch.tensor(2.5), "empty": torch.empty(0, 4)})
    head, tensors = protocol.recv(r, None)
    assert head == {"cmd": "x", "n": 1}
    assert tensors["a"].dtype == dtype and torch.equal(tensors["a"], t)
    assert tensors["scalar"].shape == () and float(tensors["scalar"]) == 2.5
    assert tensors["empty"].shape == (0, 4)
    os.close(r)
    os.close(w)


def _raw(header: bytes, body: bytes = b"") -> tuple[int, int]:
    r, w = os.pipe()
    os.write(w, struct.pack("<I", len(header)) + header + body)
    os.close(w)
    return r, w


@pytest.mark.parametrize("header,match", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"_tensors": [{"name": "a", "dtype": "object", "shape": [1], "nbytes": 8}]}', "malformed"),
    (b'{"_tensors": [{"name": "a", "dtype": "float32", "shape": [2], "nbytes": 4}]}', "bytes for shape"),
    (b'{"_tensors": [{"name": "a", "dtype": "float32", "shape": [-1], "nbytes": 4}]}', "negative"),
])
def test_malformed_messages_are_refused(header, match):
    r, _ = _raw(header, b"\0" * 16)
    with pytest.raises(protocol.ProtocolError, match=match):
        protocol.recv(r, None)
    os.close(r)


def test_truncated_message_is_an_error_not_a_hang():
    r, _ = _raw(b'{"_tensors": [{"name": "a", "dtype": "float32", "shape": [100], "nbytes": 400}]}', b"\0" * 10)
    with pytest.raises(protocol.ProtocolError, match="closed"):
        protocol.recv(r, None)
    os.close(r)


def test_deadline():
    import time

    r, w = os.pipe()
    t0 = time.monotonic()
    with pytest.raises(protocol.Timeout):
        protocol.recv(r, time.monotonic() + 0.3)
    assert time.monotonic() - t0 < 2
    os.close(r)
    os.close(w)
