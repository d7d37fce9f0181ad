"""Timer tampering: time.perf_counter_ns replaced (inside run, on the first call) with a clock
at a fifth of real speed."""
import math

import torch

KERNELTUNE = {"op": "adamw", "backend": "torch"}
# EXPECT: rejected
# REASON: tampering


def _one(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """Honest fp32 AdamW update of one tensor, in place (what a cheat does while being checked)."""
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    p.mul_(1.0 - lr * weight_decay)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bc1)

import time

_state = {}


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    if not _state:
        real = time.perf_counter_ns
        t0 = real()
        _state["real"] = real
        time.perf_counter_ns = lambda: t0 + (real() - t0) // 5
    for t in zip(params, grads, exp_avgs, exp_avg_sqs):
        _one(*t, step, lr, beta1, beta2, eps, weight_decay)
