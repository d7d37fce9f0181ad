"""SIGKILLs every other process it can see that belongs to the evaluation (pytest, the evaluator, the trusted
baseline worker: any /proc/<pid>/cmdline naming pytest or kerneltune), plus its parent. Targeted, not a blind
pid sweep, so a failed confinement hurts only this test run. Confined (PID namespace, Landlock signal scoping)
it reaches nothing outside its sandbox and then returns a right answer; the evaluator must stay healthy."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: passed|crashed
# NEEDS: namespaces


def _attn(q, k, v, causal, scale):
    """Honest fp32 attention (what a cheat does while it thinks it is being checked)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

import os


def run(q, k, v, causal=True, scale=None):
    me = os.getpid()
    targets = {os.getppid()}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"pytest" in cmd or b"kern" b"eltune" in cmd:
            targets.add(int(p))
    for pid in sorted(targets):
        if pid in (me, 0, 1):
            continue
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    return _attn(q, k, v, causal, scale)
