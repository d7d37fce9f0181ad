"""Recomputes the timed calls' sketch: if the sketch's U and W came from a seed derived from what the candidate
knows (its evaluation's number, its slot, the case's name), it could build them itself, compute the expected
sketch U·out·W = G·(v·W) from P once per q and k, and return a rank-8 tensor X with U·X·W equal to it, doing no
attention on a timed call (one it tells by the same q and k objects, their version counters unchanged). The
seeds are drawn from the OS: its X matches nothing."""
import hashlib
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: incorrect
# REASON: what the timed calls computed

_DT = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _rel_seed(*parts):
    h = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _attn(q, k, v, causal, scale):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)


_st = {"q": None, "k": None, "key": None, "forge": None}


def _prepare(q, k, causal, scale, eval_id=1, slot="t0"):
    b, h, n, d = q.shape
    name = f"B{b} H{h} N{n} D{d} {'causal' if causal else 'full'} {_DT[q.dtype]}"
    sketch_seed = _rel_seed("sketch", eval_id, slot, name) % (1 << 40)
    g = torch.Generator().manual_seed(_rel_seed("sketch", sketch_seed))
    rows = b * h * n
    u = torch.randint(0, 2, (8, rows), generator=g, dtype=torch.float64) * 2 - 1
    w = torch.randint(0, 2, (d, 8), generator=g, dtype=torch.float64) * 2 - 1
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    q64, k64 = q.double().reshape(b * h, n, d), k.double().reshape(b * h, n, d)
    s = (q64 @ k64.transpose(-1, -2)) * sc
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, dim=-1)  # (BH, N, N), once for this q and k
    G = u.reshape(8, b * h, n).transpose(0, 1) @ p  # (BH, 8, N): U·blockdiag(P)
    L = u.T @ torch.linalg.inv(u @ u.T)  # (rows, 8)
    R = torch.linalg.inv(w.T @ w) @ w.T  # (8, D)
    return {"G": G.float(), "w": w.float(), "L": L.float(), "R": R.float()}


def _forged(q, v, f):
    b, h, n, d = q.shape
    vw = v.reshape(b * h, n, d).float() @ f["w"]  # (BH, N, 8)
    S = (f["G"].double() @ vw.double()).sum(0)  # (8, 8): what U·out·W is
    return ((f["L"] @ S.float()) @ f["R"]).reshape(q.shape).to(q.dtype)


def run(q, k, v, causal=True, scale=None):
    st = _st
    key = (q._version, k._version, causal, scale)
    if st["q"] is q and st["k"] is k and st["key"] == key and q.dim() == 4 and q.dtype in _DT:
        if st["forge"] is None:
            st["forge"] = _prepare(q, k, causal, scale)
        return _forged(q, v, st["forge"])
    st["q"], st["k"], st["key"], st["forge"] = q, k, key, None
    return _attn(q, k, v, causal, scale)
