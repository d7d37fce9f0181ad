"""Numba CPU AdamW template family: how work is split across threads, the moment precision, fastmath.

Defaults: the best point of a 40-candidate search (`kerneltune search adamw --device cpu --budget 40`) on a
2-core Xeon, 2026-11-26: 1.14x of torch's fused AdamW at gpt-mini in that run (five more points at 1.00-1.06x
shared PARALLEL_MIN 4096, blocks, fp32 moments).

Knobs (KERNELTUNE["space"]):
- PARALLEL_MIN: tensors with fewer elements take a serial kernel (waking the thread pool costs more).
- SCHEDULE: "elements" = prange over the elements themselves (numba splits the range across threads);
  "static" = one contiguous slice per thread; "blocks" = prange over blocks of BLOCK elements. The last two
  loop over array slices from index 0: written as range(lo, hi) over the whole arrays, the loop stayed
  scalar (a possibly negative index), 4x slower on this repository's 2-core CI machine. Inside a prange
  numba treats the arrays as not aliasing, so all three vectorise; the serial kernel (small tensors) does not.
- BLOCK: elements per block for SCHEDULE="blocks" (a multiple of the SIMD width).
- MOMENTS: "f64" = m, v computed in float64 and rounded once; "f32" = torch's own fp32 order
  (m += (g - m)·(1-β1); v = β2·v + (1-β2)·g²), twice the SIMD width.
- FASTMATH: LLVM fast-math flags on the parameter step (reassociation; results stay within tolerance or
  the evaluator says otherwise).

Per element: read p, g, m, v (16 B), write p, m, v (12 B) = 28 B; ~16 FLOPs + sqrt + div: memory-bound.
Each tensor is viewed as a flat float32 numpy array sharing its storage, so updates land in place.
"""
import numba
import numpy as np
import torch

KERNELTUNE = {
    "op": "adamw",
    "backend": "numba",
    "params": {"PARALLEL_MIN": 4096, "SCHEDULE": "blocks", "BLOCK": 8192, "MOMENTS": "f32", "FASTMATH": True},
    "space": {
        "PARALLEL_MIN": [4096, 16384, 65536, 262144, 1048576],
        "SCHEDULE": ["elements", "static", "blocks"],
        "BLOCK": [2048, 8192, 16384, 65536],
        "MOMENTS": ["f64", "f32"],
        "FASTMATH": [False, True],
    },
    "restrictions": ["SCHEDULE == 'blocks' or BLOCK == 16384"],
}

P = KERNELTUNE["params"]
PARALLEL_MIN = int(P["PARALLEL_MIN"])
BLOCK = int(P["BLOCK"])
F64 = P["MOMENTS"] == "f64"
BLOCKS = P["SCHEDULE"] == "blocks"
ELEMENTS = P["SCHEDULE"] == "elements"
FAST = bool(P["FASTMATH"])


@numba.njit(inline="always", fastmath=FAST)
def _elem(p, g, m, v, i, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps):
    if F64:
        gd = np.float64(g[i])
        mf = np.float32(b1 * np.float64(m[i]) + omb1 * gd)
        vf = np.float32(b2 * np.float64(v[i]) + omb2 * gd * gd)
    else:
        gf = g[i]
        mi = m[i]
        mf = mi + (gf - mi) * np.float32(omb1)          # torch: exp_avg.lerp_(grad, 1 - beta1)
        vf = v[i] * np.float32(b2) + np.float32(omb2) * gf * gf   # exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
    m[i] = mf
    v[i] = vf
    denom = np.sqrt(vf) / np.float32(bc2_sqrt) + np.float32(eps)
    p[i] = p[i] * np.float32(decay) - np.float32(step_size) * mf / denom


@numba.njit(inline="always", fastmath=FAST)
def _span(p, g, m, v, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps):
    # one slice, indexed from 0: the index is provably non-negative, so no wraparound check stops LLVM's
    # vectoriser (a range(lo, hi) loop over the whole arrays stays scalar)
    for i in range(p.shape[0]):
        _elem(p, g, m, v, i, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps)


@numba.njit(parallel=True, nogil=True, fastmath=FAST)
def _parallel(p, g, m, v, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps):
    # p, g, m, v: (n,) float32
    n = p.shape[0]
    if ELEMENTS:
        for i in numba.prange(n):
            _elem(p, g, m, v, i, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps)
    elif BLOCKS:
        nb = (n + BLOCK - 1) // BLOCK
        for b in numba.prange(nb):
            lo = b * BLOCK
            hi = min(n, lo + BLOCK)
            _span(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps)
    else:
        nt = numba.get_num_threads()
        chunk = (n + nt - 1) // nt
        for t in numba.prange(nt):
            lo = t * chunk
            hi = min(n, lo + chunk)
            _span(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps)


@numba.njit(nogil=True, fastmath=FAST)
def _serial(p, g, m, v, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps):
    _span(p, g, m, v, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps)


def _flat(t):
    # (any shape) contiguous fp32 CPU tensor -> (numel,) numpy view of the same storage (numpy's reshape of a
    # contiguous array is a view, and cheaper than torch's)
    return t.detach().numpy().reshape(-1)


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    if not (len(params) == len(grads) == len(exp_avgs) == len(exp_avg_sqs)):
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs must have equal length")
    step = int(step)
    bc1 = 1.0 - beta1 ** step
    scal = (1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, lr / bc1,
            (1.0 - beta2 ** step) ** 0.5, eps)
    if not F64:  # fp32 moments: the scalars as the fp32 values the kernel uses (an fp32-typed specialisation)
        scal = tuple(np.float32(x) for x in scal)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if p.device.type != "cpu" or p.dtype != torch.float32:
            raise TypeError("numba AdamW takes float32 CPU tensors")
        n = p.numel()
        if n == 0:
            continue
        work = [t if t.is_contiguous() else t.contiguous() for t in (p, m, v)]
        (_parallel if n >= PARALLEL_MIN else _serial)(
            _flat(work[0]), _flat(g.contiguous()), _flat(work[1]), _flat(work[2]), *scal)
        for dst, src in zip((p, m, v), work):
            if dst is not src:
                dst.copy_(src)
    return None
