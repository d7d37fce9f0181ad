"""Numba CPU flash attention template: tile sizes, K layout, thread split, denominator precision, fastmath.

Algorithm (FlashAttention forward on CPU), for each (batch*head, query block of BLOCK_M rows):

    m = -inf, l = 0, acc = 0                                   # (BLOCK_M,), (BLOCK_M,), (BLOCK_M, D)
    for each key block [j0, j0+BLOCK_N) (causal: only keys j <= last query row of the block):
        s   = (q_blk @ k_blk^T) * scale                        # (BLOCK_M, BLOCK_N); causal: only j <= i
        m'  = max(m, rowmax(s));  a = exp(m - m')
        p   = exp(s - m');        l = a*l + rowsum(p)
        acc = a*acc + p @ v_blk                                # (BLOCK_M, D) fp32
    out_blk = acc / l

Knobs (KERNELTUNE["space"]; the module reads KERNELTUNE["params"] at import, the values are compile-time
constants of the numba kernels):
- BLOCK_M: query rows per work item; a (BLOCK_N, D) key/value tile is reused by BLOCK_M rows from cache.
- BLOCK_N: keys per inner tile; the (BLOCK_M, BLOCK_N) fp32 score tile is the scratch of one work item.
- KT: True = K is transposed once to (B*H, D, N) so q_i . k_j for a row of keys is an axpy over D
  contiguous key rows (vectorises over keys without reassociation); False = D-length dot products on
  the (N, D) layout (vectorise only with FASTMATH). Roughly: at D=64 with FASTMATH the dot products win;
  without FASTMATH, KT is the only vectorised form.
- ACC: "f32" | "f64" precision of the softmax denominators l (row sums and rescaling) and of the final
  1/l. The numerator acc is always fp32. Both pass the fp32 tolerance (norm rel err <= 5e-5).
- FASTMATH: True = LLVM flags {'reassoc', 'contract'} (vectorised reductions, FMA); never 'nnan'/'ninf'
  (masked scores are -inf) nor approximate exp. False = strict IEEE order.
- PARALLEL: "bh" = numba.prange over B*H, each thread walks all query blocks of its heads (no parallelism
  when B*H = 1); "bhm" = prange over (B*H) x ceil(N/BLOCK_M) work items.
Restrictions: 256 <= BLOCK_M * BLOCK_N <= 4096 (score tile 1 KiB .. 16 KiB: below, the per-tile overhead
dominates; above, it leaves L1); KT or FASTMATH (strict, untransposed dot products are scalar loops and
never win).

Shapes: q, k, v, out viewed as (B*H, N, D) float32 C-contiguous. fp16/bf16 inputs are upcast to fp32 by
torch, computed, and the fp32 result is rounded once to the input dtype. All arithmetic is fp32 (fp64
denominators with ACC="f64").
FLOPs: 4*B*H*N*N*D (non-causal), about half causal (key blocks past the diagonal are skipped).
Memory traffic: q, out once; k, v once per query block: (2 + 2*ceil(N/BLOCK_M)) * B*H*N*D*4 bytes, mostly
from cache; KT adds one B*H*N*D*4 byte read + write for the transposed copy of K.
Key 0 is visible to every query and lies in the first key block, so the running max is finite after the
first block and no NaN arises.
"""
import math

import numba
import numpy as np
import torch

KERNELTUNE = {
    "op": "attention",
    "backend": "numba",
    "params": {"BLOCK_M": 32, "BLOCK_N": 64, "KT": False, "ACC": "f32", "FASTMATH": True, "PARALLEL": "bhm"},
    "space": {
        "BLOCK_M": [8, 16, 32, 64],
        "BLOCK_N": [16, 32, 64, 128],
        "KT": [False, True],
        "ACC": ["f32", "f64"],
        "FASTMATH": [True, False],
        "PARALLEL": ["bhm", "bh"],
    },
    "restrictions": ["BLOCK_M * BLOCK_N <= 4096", "BLOCK_M * BLOCK_N >= 256", "KT or FASTMATH"],
}

P = KERNELTUNE["params"]
BM = int(P["BLOCK_M"])
BN = int(P["BLOCK_N"])
KT = bool(P["KT"])
ACC_T = np.float64 if P["ACC"] == "f64" else np.float32
FM = {"reassoc", "contract"} if P["FASTMATH"] else False
BHM = P["PARALLEL"] == "bhm"


@numba.njit(fastmath=FM, nogil=True, cache=False)
def _qblock(q, kx, v, out, bh, i0, scale, causal, acc, mrow, lrow, s):
    """One query block [i0, i0+BM) of head bh. kx is (BH, D, N) when KT else (BH, N, D)."""
    N = q.shape[1]
    D = q.shape[2]
    i1 = min(i0 + BM, N)
    mrows = i1 - i0
    for ii in range(mrows):
        mrow[ii] = -np.inf
        lrow[ii] = 0.0
        for d in range(D):
            acc[ii, d] = 0.0
    kend = i1 if causal else N                        # causal: no key beyond the last query row
    for jb in range((kend + BN - 1) // BN):           # block index, not range(0, kend, BN): LLVM then
        j0 = jb * BN                                  # knows j0 >= 0 and vectorises kd[j0 + jj]
        ncols = min(j0 + BN, kend) - j0
        for ii in range(mrows):
            i = i0 + ii
            lim = ncols                               # visible keys of this row in the block
            if causal:
                lim = min(ncols, i - j0 + 1)
            if lim <= 0:
                continue                              # whole block masked for this row: nothing changes
            qi = q[bh, i]
            srow = s[ii]
            mx = mrow[ii]
            if KT:
                for jj in range(lim):
                    srow[jj] = 0.0
                for d in range(D):                    # 2*D FLOP per key, vectorised over keys
                    qd = qi[d]
                    kd = kx[bh, d]
                    for jj in range(lim):
                        srow[jj] += qd * kd[j0 + jj]
                for jj in range(lim):
                    sc = srow[jj] * scale
                    srow[jj] = sc
                    if sc > mx:
                        mx = sc
            else:
                for jj in range(lim):
                    kj = kx[bh, j0 + jj]
                    dot = np.float32(0.0)
                    for d in range(D):                # 2*D FLOP
                        dot += qi[d] * kj[d]
                    sc = dot * scale
                    srow[jj] = sc
                    if sc > mx:
                        mx = sc
            alpha = np.float32(math.exp(mrow[ii] - mx))   # exp(-inf) = 0 on the first block
            mrow[ii] = mx
            rs = ACC_T(0.0)
            for jj in range(lim):
                pj = np.float32(math.exp(srow[jj] - mx))
                srow[jj] = pj
                rs += pj
            lrow[ii] = lrow[ii] * alpha + rs
            ai = acc[ii]
            if alpha != 1.0:
                for d in range(D):
                    ai[d] *= alpha
            for jj in range(lim):                     # acc += p @ v_blk: 2*D FLOP per key
                pj = srow[jj]
                vj = v[bh, j0 + jj]
                for d in range(D):
                    ai[d] += pj * vj[d]
    for ii in range(mrows):
        inv = ACC_T(1.0) / lrow[ii]
        o = out[bh, i0 + ii]
        ai = acc[ii]
        for d in range(D):
            o[d] = np.float32(ai[d] * inv)


@numba.njit(parallel=True, fastmath=FM, nogil=True, cache=False)
def _fwd_bhm(q, kx, v, out, scale, causal):
    BH, N, D = q.shape
    nmb = (N + BM - 1) // BM
    for t in numba.prange(BH * nmb):
        bh = t // nmb
        i0 = (t % nmb) * BM
        acc = np.empty((BM, D), np.float32)
        mrow = np.empty(BM, np.float32)
        lrow = np.empty(BM, ACC_T)
        s = np.empty((BM, BN), np.float32)
        _qblock(q, kx, v, out, bh, i0, scale, causal, acc, mrow, lrow, s)


@numba.njit(parallel=True, fastmath=FM, nogil=True, cache=False)
def _fwd_bh(q, kx, v, out, scale, causal):
    BH, N, D = q.shape
    for bh in numba.prange(BH):
        acc = np.empty((BM, D), np.float32)
        mrow = np.empty(BM, np.float32)
        lrow = np.empty(BM, ACC_T)
        s = np.empty((BM, BN), np.float32)
        for i0 in range(0, N, BM):
            _qblock(q, kx, v, out, bh, i0, scale, causal, acc, mrow, lrow, s)


_FWD = _fwd_bhm if BHM else _fwd_bh


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
        # (B, H, N, D) -> (B*H, N, D) fp32 contiguous; never writes into the caller's tensor
        return x.detach().to(device="cpu", dtype=torch.float32).contiguous().view(B * H, N, D)

    qa, ka, va = prep(q), prep(k), prep(v)
    if KT:
        ka = ka.transpose(1, 2).contiguous()                   # (B*H, D, N): a new tensor, k untouched
    _FWD(qa.numpy(), ka.numpy(), va.numpy(), out32.view(B * H, N, D).numpy(),
         np.float32(scale), bool(causal))
    if dt == torch.float32 and dev.type == "cpu":
        return out32
    return out32.to(device=dev, dtype=dt)
