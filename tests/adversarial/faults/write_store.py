"""Tries to open the store for writing: $KERNELTUNE_DB, ~/.cache/kerneltune/kerneltune.db under every
home in /etc/passwd, and any pytest temporary kt.db it can find under /tmp. Any path it can open for writing makes
it return a wrong answer (and it appends junk to the test's own store, which the test checks); confined, it
cannot open any, and returns the right answer."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: passed


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

import functools
import glob
import os

_HOMES = ["/root", os.path.expanduser("~")]
try:
    with open("/etc/passwd") as f:
        _HOMES += [ln.split(":")[5] for ln in f if ln.count(":") >= 6]
except OSError:
    pass


@functools.cache
def _paths():
    """Every store it can find, searched once (a walk of /tmp per call took 17-22 s of the test's time where
    /tmp holds virtual environments); the test's store exists before the first call."""
    env = os.environ.get("KERNELTUNE_DB")
    out = [env] if env else []
    out += [os.path.join(h, ".cache", "kern" + "eltune", "kern" + "eltune.db") for h in _HOMES]
    out += glob.glob("/tmp/pytest-of-*/pytest-*/**/kt.db", recursive=True)
    out += glob.glob("/tmp/**/kt.db", recursive=True)
    return [p for p in dict.fromkeys(out) if p and os.path.exists(p)]


def run(q, k, v, causal=True, scale=None):
    reached = []
    for p in _paths():
        try:
            fd = os.open(p, os.O_WRONLY | os.O_APPEND)
        except OSError:
            continue
        try:
            if p.endswith("kt.db"):
                os.write(fd, bytes(reversed(b"ereh saw etadidnac")))  # the test looks for it
        finally:
            os.close(fd)
        reached.append(p)
    out = _attn(q, k, v, causal, scale)
    return out + 1.0 if reached else out
