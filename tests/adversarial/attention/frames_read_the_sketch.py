"""Reads the timed calls' check from the evaluator's own frames: sys._current_frames (not a name the static scan
knows) and the frames' back/locals attributes spelled at run time, up to the worker's timing loop, whose locals
hold the sketch's U and W; with them it returns, on a timed call, a rank-8 tensor made to match the sketch and
does no attention (36x before the runtime guard). The worker's audit hook refuses the frame access."""
import math
import sys
import threading

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: rejected
# REASON: the evaluator's own state

_BACK, _LOCALS = "f_" + "back", "f_" + "locals"


def _attn(q, k, v, causal, scale):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)


def _vouch():
    f = sys._current_frames().get(threading.get_ident())
    while f is not None:
        if f.f_code.co_name == "time":
            vo = getattr(f, _LOCALS).get("vouch")
            if vo is not None and getattr(vo, "sketch", None) is not None:
                return vo
        f = getattr(f, _BACK)
    return None


_cache = {}


def _prepare(q, k, causal, scale, u, w):
    b, h, n, d = q.shape
    u, w = u.double(), w.double()
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    q64, k64 = q.double().reshape(b * h, n, d), k.double().reshape(b * h, n, d)
    s = (q64 @ k64.transpose(-1, -2)) * sc
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    G = u.reshape(8, b * h, n).transpose(0, 1) @ torch.softmax(s, dim=-1)
    L = u.T @ torch.linalg.inv(u @ u.T)
    R = torch.linalg.inv(w.T @ w) @ w.T
    return {"G": G.float(), "w": w.float(), "L": L.float(), "R": R.float()}


def run(q, k, v, causal=True, scale=None):
    vo = _vouch()
    if vo is None or vo.tensors.get("q") is not q or q.dim() != 4:
        return _attn(q, k, v, causal, scale)
    u, w = vo.sketch
    key = (id(q), q._version, id(k), k._version, id(u), causal, scale)
    f = _cache.get(key)
    if f is None:
        _cache.clear()
        f = _cache[key] = _prepare(q, k, causal, scale, u, w)
    b, h, n, d = q.shape
    vw = v.reshape(b * h, n, d).float() @ f["w"]
    S = (f["G"].double() @ vw.double()).sum(0)
    return ((f["L"] @ S.float()) @ f["R"]).reshape(q.shape).to(q.dtype)
