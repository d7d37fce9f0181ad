"""Numba CPU flash-style attention: query row-blocks in parallel, key blocks streamed with an online softmax.

Algorithm (FlashAttention-1 forward on CPU), for each (batch*head, query block of BM rows) in a ``prange``:

    m = -inf, l = 0, acc = 0                                   # (BM,), (BM,), (BM, D) fp32
    for each key block [j0, j1) (causal: only blocks with j0 <= last query row of the block):
        s   = (q_blk @ k_blk^T) * scale                        # (BM, BN); causal: s[i, j] = -inf for j > i
        m'  = max(m, rowmax(s));  a = exp(m - m')
        p   = exp(s - m');        l = a*l + rowsum(p)
        acc = a*acc + p @ v_blk                                # (BM, D)
    out_blk = acc / l

Shapes: q, k, v, out viewed as (B*H, N, D) float32. fp16/bf16 inputs are upcast to fp32 by torch, computed,
and the fp32 result is rounded once to the input dtype. Everything accumulates in fp32.
FLOPs: 4*B*H*N*N*D (non-causal), about half that causal (blocks above the diagonal are skipped).
Memory traffic: q, out once; k, v once per query block: (2 + 2*ceil(N/BM)) * B*H*N*D*4 bytes, mostly from L2.

fastmath is limited to {'reassoc', 'contract'} so the D-length dot products vectorise; no 'nnan'/'ninf'
(masked scores are -inf) and no approximate functions. Row 0's key 0 is visible to every query, and the
first key block always contains it, so the running max is finite after the first block and no NaN arises.
"""
import math

import numba
import numpy as np
import torch

KERNELTUNE = {
    "op": "attention",
    "backend": "numba",
    "params": {"BM": 32, "BN": 64},
    "space": {"BM": [16, 32, 64], "BN": [32, 64, 128]},
}

_FM = {"reassoc", "contract"}


@numba.njit(parallel=True, fastmath=_FM, nogil=True, cache=False)
def _attn_fwd(q, k, v, out, scale, causal, BM, BN):
    # q, k, v, out: (BH, N, D) float32 C-contiguous
    BH, N, D = q.shape
    nmb = (N + BM - 1) // BM
    for t in numba.prange(BH * nmb):
        bh = t // nmb
        i0 = (t % nmb) * BM
        i1 = min(i0 + BM, N)
        mrows = i1 - i0
        acc = np.zeros((BM, D), np.float32)           # (BM, D) running numerator
        mrow = np.full(BM, -np.inf, np.float32)       # (BM,) running max
        lrow = np.zeros(BM, np.float32)               # (BM,) running denominator
        s = np.empty((BM, BN), np.float32)            # (BM, BN) scores / probabilities
        kend = i1 if causal else N                    # causal: no key beyond the last query row
        for j0 in range(0, kend, BN):
            j1 = min(j0 + BN, kend)
            ncols = j1 - j0
            for ii in range(mrows):
                qi = q[bh, i0 + ii]
                # causal: keys j > i are masked; visible columns of this row in the block
                lim = ncols
                if causal:
                    lim = min(ncols, i0 + ii - j0 + 1)
                mx = mrow[ii]
                for jj in range(lim):
                    kj = k[bh, j0 + jj]
                    dot = np.float32(0.0)
                    for d in range(D):                # 2*D FLOP
                        dot += qi[d] * kj[d]
                    sc = dot * scale
                    s[ii, jj] = sc
                    if sc > mx:
                        mx = sc
                if lim <= 0:
                    continue                          # whole block masked for this row: nothing changes
                alpha = np.float32(math.exp(mrow[ii] - mx))   # exp(-inf) = 0 on the first block
                mrow[ii] = mx
                rs = np.float32(0.0)
                for jj in range(lim):
                    pj = np.float32(math.exp(s[ii, jj] - mx))
                    s[ii, jj] = pj
                    rs += pj
                lrow[ii] = lrow[ii] * alpha + rs
                ai = acc[ii]
                if alpha != 1.0:
                    for d in range(D):
                        ai[d] *= alpha
                for jj in range(lim):                 # acc += p @ v_blk: 2*D FLOP per key
                    pj = s[ii, jj]
                    vj = v[bh, j0 + jj]
                    for d in range(D):
                        ai[d] += pj * vj[d]
        for ii in range(mrows):
            inv = np.float32(1.0) / lrow[ii]
            o = out[bh, i0 + ii]
            ai = acc[ii]
            for d in range(D):
                o[d] = ai[d] * inv


def run(q, k, v, causal=True, scale=None):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError("q, k, v must all be (B, H, N, D) with one shape")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("q, k, v must share one dtype: float32, float16 or bfloat16")
    B, H, N, D = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    dev, dt = q.device, q.dtype
    out32 = torch.empty((B, H, N, D), dtype=torch.float32)
    if out32.numel() == 0:
        return out32.to(device=dev, dtype=dt)

    def prep(x):
        # (B, H, N, D) -> (B*H, N, D) fp32 contiguous numpy; never writes into the caller's tensor
        x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
        return x.view(B * H, N, D).numpy()

    qa, ka, va = prep(q), prep(k), prep(v)
    BM = int(KERNELTUNE["params"]["BM"])
    BN = int(KERNELTUNE["params"]["BN"])
    _attn_fwd(qa, ka, va, out32.view(B * H, N, D).numpy(), np.float32(scale), bool(causal), BM, BN)
    if dt == torch.float32 and dev.type == "cpu":
        return out32
    return out32.to(device=dev, dtype=dt)
