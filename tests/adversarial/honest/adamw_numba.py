"""Honest: a numba kernel per tensor over flat numpy views of the caller's buffers (float64 math, rounded once)."""
import math

import numba
import numpy as np
import torch

KERNELTUNE = {"op": "adamw", "backend": "numba"}
# EXPECT: passed


@numba.njit(cache=False, fastmath=False)
def _kernel(p, g, m, v, decay, b1, b2, step_size, bc2_sqrt, eps):
    for i in range(p.size):
        gi = np.float64(g[i])
        mi = b1 * np.float64(m[i]) + (1.0 - b1) * gi
        vi = b2 * np.float64(v[i]) + (1.0 - b2) * gi * gi
        m[i] = mi
        v[i] = vi
        mi32 = np.float64(np.float32(mi))
        vi32 = np.float64(np.float32(vi))
        p[i] = np.float64(p[i]) * decay - step_size * mi32 / (math.sqrt(vi32) / bc2_sqrt + eps)


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if p.numel() == 0:
            continue
        views = [t.detach().view(-1).numpy() for t in (p, g, m, v)]
        _kernel(*views, 1.0 - lr * weight_decay, beta1, beta2, lr / bc1, bc2_sqrt, eps)
