"""Numba CPU AdamW: one fused, parallel pass per tensor; moments in float64 rounded once, step in fp32 SIMD.

Algorithm (decoupled weight decay, bias correction, 1-based ``step``), per element:

    p  <- p * (1 - lr*wd)
    m  <- b1*m + (1-b1)*g
    v  <- b2*v + (1-b2)*g*g
    p  <- p - (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)      bc1 = 1-b1**step, bc2 = 1-b2**step

Each tensor is viewed as a flat contiguous float32 numpy array sharing the tensor's storage
(``t.detach().numpy().reshape(-1)``), so the update lands in the caller's tensor objects.
Memory traffic per element: read p, g, m, v (16 B) + write p, m, v (12 B) = 28 B; ~15 FLOP + 1 sqrt + 1 div.
It is bandwidth bound. m and v are computed in float64 and rounded once (correctly rounded even under
cancellation); the parameter step uses IEEE fp32 sqrt/division in torch's order, which keeps the loop
8-wide SIMD (float64 sqrt/div made it ~1.6x slower) at an error of a few ulp of the step.

Large tensors use a ``prange`` over their elements, split over the cores; small tensors (below ``PARALLEL_MIN``)
use a serial kernel, because waking the thread pool costs more than the work.
fastmath is off: no reassociation, no approximate sqrt/division.
"""
import numba
import numpy as np
import torch

KERNELTUNE = {
    "op": "adamw",
    "backend": "numba",
    "params": {"PARALLEL_MIN": 1 << 16},
    "space": {"PARALLEL_MIN": [1 << 12, 1 << 14, 1 << 16, 1 << 18]},
}

PARALLEL_MIN = KERNELTUNE["params"]["PARALLEL_MIN"]


def _body(p, g, m, v, i, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps):
    # m, v: the moment updates are computed in float64 and rounded once, so exp_avg / exp_avg_sq are
    # correctly rounded even when b1*m and (1-b1)*g nearly cancel (fp32 math loses digits there).
    # The parameter step uses float32 sqrt / division (IEEE, no fastmath): its error is a few ulp of
    # the step, far below the step's own size, and it keeps the loop 8-wide SIMD.
    gd = np.float64(g[i])
    mf = np.float32(b1 * np.float64(m[i]) + omb1 * gd)
    vf = np.float32(b2 * np.float64(v[i]) + omb2 * gd * gd)
    m[i] = mf
    v[i] = vf
    denom = np.sqrt(vf) / np.float32(bc2_sqrt) + np.float32(eps)
    p[i] = p[i] * np.float32(decay) - np.float32(step_size) * mf / denom


_body_jit = numba.njit(inline="always", fastmath=False)(_body)


@numba.njit(parallel=True, fastmath=False, nogil=True, cache=False)
def _adamw_parallel(p, g, m, v, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps):
    # p, g, m, v: (n,) float32, contiguous; 28 B of traffic per element. prange over the elements themselves:
    # numba splits the range across the threads and LLVM vectorises the body (a prange over threads with an
    # inner range(lo, hi) loop stays scalar: 4x slower on a 2-core x86 machine, measured)
    for i in numba.prange(p.shape[0]):
        _body_jit(p, g, m, v, i, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps)


@numba.njit(parallel=False, fastmath=False, nogil=True, cache=False)
def _adamw_serial(p, g, m, v, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps):
    # p, g, m, v: (n,) float32, contiguous
    for i in range(p.shape[0]):
        _body_jit(p, g, m, v, i, decay, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps)


def _flat(t):
    # (any shape) contiguous fp32 CPU tensor -> (numel,) numpy view of the same storage
    return t.detach().numpy().reshape(-1)


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n):
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs must have equal length")
    step = int(step)
    if step < 1:
        raise ValueError("step is 1-based")
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    eps, weight_decay = float(eps), float(weight_decay)
    # host scalars in float64
    decay = 1.0 - lr * weight_decay
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    step_size = lr / bc1
    bc2_sqrt = bc2 ** 0.5
    omb1 = 1.0 - beta1
    omb2 = 1.0 - beta2
    scalars = (decay, beta1, omb1, beta2, omb2, step_size, bc2_sqrt, eps)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        if p.device.type != "cpu":
            raise ValueError("numba AdamW runs on CPU tensors only")
        if p.dtype != torch.float32:
            raise TypeError("numba AdamW expects float32 tensors")
        numel = p.numel()
        if numel == 0:
            continue
        # contiguous is the contract; be safe anyway: work on copies and write back
        work = [t if t.is_contiguous() else t.contiguous() for t in (p, m, v)]
        gc = g if g.is_contiguous() else g.contiguous()
        pa, ma, va = (_flat(t) for t in work)
        ga = _flat(gc)
        kern = _adamw_parallel if numel >= PARALLEL_MIN else _adamw_serial
        kern(pa, ga, ma, va, *scalars)
        for dst, src in zip((p, m, v), work, strict=True):
            if dst is not src:
                with torch.no_grad():
                    dst.copy_(src)
    return None
