"""Triton FlashAttention-2 backward: delta preprocess, a dK/dV kernel over query blocks, a dQ kernel over key blocks.

Given q, k, v, o, dO (B, H, N, D) and lse (B, H, N, fp32, natural log) from the forward:

    1. delta = rowsum(dO ∘ O)                                   (B, H, N) fp32, one pass over o and dO
    2. per key block (BLOCK_N1 keys), over the query blocks that can see it (causal: from the diagonal on):
           sᵀ  = k qᵀ                      (BLOCK_N1, BLOCK_M1) fp32
           pᵀ  = exp2(sᵀ·scale·log2e - lse·log2e)               the forward's probabilities, recomputed
           dV += pᵀ dO;   dpᵀ = v dOᵀ;   dsᵀ = pᵀ ∘ (dpᵀ - delta);   dK += dsᵀ q
       dK *= scale
    3. per query block (BLOCK_M2 rows), over the key blocks it sees (causal: up to its diagonal):
           p = exp2(s·scale·log2e - lse·log2e);  dp = dO vᵀ;  ds = p ∘ (dp - delta);  dQ += ds k
       dQ *= scale

By default no atomics: dK/dV and dQ each have one owner program (ATOMIC_DQ below is the other way). p and ds
are rounded to the input dtype for the tensor-core dots (fp32 accumulate), as every fused backward does; fp32
inputs use input_precision="ieee".
Masks only where a score can be masked: the causal diagonal blocks and the N tail are a masked stage of
their own, the rest of each loop runs without masks (as in triton_fa2.py). Causal grids start with the
heaviest blocks (dK/dV: the first key blocks; dQ: the last query blocks).
Program order (GROUP_BY_HEAD, as in triton_fa2.py): 1-D grids; with 1 (the default) a head's blocks are
consecutive programs, so the programs resident at once share their head's q/dO (dK/dV kernel) or k/v (dQ
kernel) in L2; with 0 consecutive programs walk the heads, and when B·H exceeds the resident programs every
program streams its head's q/dO or k/v from HBM (at N = 2048, D = 128, 16k tokens: up to 4 GB for dK/dV with
64-key blocks plus 2 GB for dQ, up to 2 ms of an H100's bandwidth, of the 2.6 ms that shape took).

Work: 10·B·H·N²·D FLOPs (half causal) + the recomputation of s: 12·B·H·N²·D counted over both kernels'
dots (s is computed twice, once in each). HBM: q, k, v, o, do, lse read, dq, dk, dv written, plus the
re-reads of q/do (dK/dV kernel) and k/v (dQ kernel) per block, mostly from L2.
Runs on CUDA and under the Triton CPU interpreter (TRITON_INTERPRET=1; fp32/fp16 there).

Defaults: dK/dV with 64 keys per program (the two fp32 accumulators, 2·64·D, fit 4 warps' registers at
D = 128 without spills; a launch takes at most a warp per 16 rows of its larger block), dQ with 128 query rows
and 64 keys per step on 8 warps.
Template knobs (KERNELTUNE["space"]): BLOCK_M1/BLOCK_N1 (query/key block of the dK/dV kernel), BLOCK_M2/BLOCK_N2
(of the dQ kernel), num_warps, num_stages (both kernels). Restrictions keep the fp32 tiles in registers:
BLOCK_M1·BLOCK_N1 <= 2048·num_warps and BLOCK_M2·BLOCK_N2 <= 2048·num_warps, and (compiled for sm90 at D = 128
with Triton 3.6, benchmarks/gpu/compile_check.py: every point of these kernels' knobs) no more than 16 key rows
a warp for the dK/dV accumulators (BLOCK_N1 = 128 on 4 warps spilled 870-1670 B a thread at every stage count)
and 16 query rows a warp for dQ's (BLOCK_M2 = 128 on 4 warps: 120-960 B); BLOCK_M1 = 64 left the space (the
two-stage kernel spilled in 20 of its other 30 compiles, 8-280 B; the warp-specialised one at D = 128 too). The
other bounds do not bind TMA = 2, whose fixed block is split between two consumer warp groups.
GROUP_BY_HEAD: the program order.
TMA: 1 loads the inner loops' tiles (q and dO in dK/dV, k and v in dQ) through host-made tensor descriptors of
the (B*H, N, D) views, as triton_fa2.py's TMA knob does (rows past N and columns past D read as 0; only
where rows and bases are 16-byte aligned, else pointer loads). 2 runs the warp-specialised kernels
(_bwd_dkdv_ws, _bwd_dq_ws), the form triton_fa2.py's TMA = 2 describes: each kernel one loop with
warp_specialize, every tile through descriptors made in the kernel (the fixed operands, k/v in dK/dV and
q/dO in dQ, through the flat (B*H*N, D) view; the row statistics through (1, BLOCK_M) boxes of rows padded to
a multiple of 4, so that the boxes start 16-byte aligned, read as zeros past N), and only the causal mask, a
select of one compare a score on every block: the rows and keys past N that the boxes read as zeros add
nothing to what is stored (see the kernels), but for dQ's keys past N in full attention, masked where N is
not a multiple of BLOCK_N2. Triton's Hopper pass makes each program a producer warp group
and two consumer warp groups of half the fixed block each: BLOCK_N1 = 128 keys, BLOCK_M2 = 128 rows (the pass
splits no smaller block; at 64 both groups would compute the same rows), and dQ's key steps BLOCK_N2 = 64
(smaller ones are thin tensor-core dots; 128 spilled in the causal dQ kernel at D = 128). num_warps = 4 (a
consumer group), no atomic dq. At run time a fixed block clamped below 128 (N <= 64) and fp32 inputs (whose
dots are not on the tensor cores, so nothing is specialised) take the TMA = 1 kernels; an OutOfResources
retries with fewer stages, then smaller loop blocks, then the TMA = 1 kernels.
ATOMIC_DQ: 1 drops the dQ kernel (step 3): the dK/dV kernel, which already has ds for every (query block, key
block) pair, adds ds·k·scale into an fp32 dq with relaxed 128-bit atomics (then one cast to the input dtype).
The scores are computed once instead of twice: 5 of the 7 tensor-core dots per pair (10·B·H·N²·D FLOPs in
all, half causal), for N·D·4 bytes of atomics to L2 per key block of a head (half of it on average, causal).
Each key block's unmasked loop starts at its own query block (rotated by its block index), so the programs of
one head resident at once add to different dq rows rather than all to the same ones. The order of the fp32
adds varies, so dq is not bitwise the same from run to run (as in every atomic-dq backward). BLOCK_M2/BLOCK_N2
then mean nothing: one value each in the space. The fp32 dq tile costs registers: in a sweep of every dK/dV
block, warp, stage and TMA value (sm90, D = 128, Triton 3.6) only 16 query rows by 128 keys on 8 warps never
spilled (64 keys run on 4 warps: 2-55 spill stores at 34 of 40 points; 32x128 on 8 warps: 1-8 at 5 of 10), so
the space takes ATOMIC_DQ with that block only.
At run time blocks are clamped to
the padded N and, for D > 128 or fp32 at D = 128, to 64; an OutOfResources retries with fewer stages, then
smaller blocks.
"""
import math

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

KERNELTUNE = {
    "op": "attention_backward",
    "backend": "triton",
    "params": {"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 128, "BLOCK_N2": 64, "num_warps": 8, "num_stages": 2,
               "GROUP_BY_HEAD": 1, "TMA": 0, "ATOMIC_DQ": 0},
    "space": {
        "BLOCK_M1": [16, 32],
        "BLOCK_N1": [64, 128],
        "BLOCK_M2": [64, 128],
        "BLOCK_N2": [16, 32, 64],
        "num_warps": [4, 8],
        "num_stages": [1, 2, 3, 4, 5],
        "GROUP_BY_HEAD": [1, 0],
        "TMA": [0, 1, 2],
        "ATOMIC_DQ": [0, 1],
    },
    "restrictions": [
        # the register bounds of the two-stage kernels; TMA = 2's consumers are two warp groups of 4 (below)
        "BLOCK_M1 * BLOCK_N1 <= 2048 * num_warps or TMA == 2",
        "BLOCK_M2 * BLOCK_N2 <= 2048 * num_warps or TMA == 2",
        "BLOCK_N1 <= 16 * num_warps or TMA == 2",
        "BLOCK_M2 <= 16 * num_warps or TMA == 2",
        # warp-specialised: 128 keys (dK/dV) and 128 query rows (dQ) split between the two consumer warp groups
        # (the pass splits no smaller block); dQ's key steps of 64 or more (smaller are thin wgmmas); at most 4
        # stages (5 of dQ's k/v ring take 242 KiB of shared memory at D = 128)
        "TMA != 2 or (num_warps == 4 and ATOMIC_DQ == 0 and GROUP_BY_HEAD == 1)",
        "TMA != 2 or (BLOCK_N1 == 128 and BLOCK_M2 == 128 and BLOCK_N2 >= 64 and num_stages <= 4)",
        # atomic dq: the dQ kernel's knobs at one value; 16x128 dK/dV blocks on 8 warps, the only ones without
        # spills at D = 128 (compile-sm90-triton3.6-sweep.csv)
        "ATOMIC_DQ == 0 or (BLOCK_M2 == 64 and BLOCK_N2 == 16 and BLOCK_M1 == 16 and BLOCK_N1 == 128)",
    ],
}

LOG2E = 1.4426950408889634


@triton.jit
def _bwd_delta(Out, DO, Delta, N, D, RS, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta[bh, i] = sum_d o[bh, i, d] * do[bh, i, d] in fp32 (rows RS apart); reads o and do once
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (offs_d[None, :] < D)
    off = bh * N * D + rows[:, None] * D + offs_d[None, :]
    o = tl.load(Out + off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + bh * RS + rows, tl.sum(o * do, 1), mask=rows < N)


@triton.jit
def _program(BH, n_blocks, GROUP_BY_HEAD: tl.constexpr):
    """(head, block) of this program on the 1-D grid of BH·n_blocks programs (see GROUP_BY_HEAD)."""
    pid = tl.program_id(0)
    if GROUP_BY_HEAD:
        bh = pid // n_blocks
        blk = pid % n_blocks
    else:
        bh = pid % BH
        blk = pid // BH
    return bh, blk


@triton.jit
def _load_pair(X, Y, XD, YD, bh, off_bh, start, rows, offs_d, N, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr):
    """The (BLOCK, BLOCK_D) tiles at ``rows`` (= start + arange) of two (B*H, N, D) tensors of one head: through
    the descriptors' (1, BLOCK, BLOCK_D) boxes with TMA (rows past N, columns past D read 0), else pointer loads
    masked as the stage needs (rows and columns, columns only, or none)."""
    if TMA:
        x = XD.load([bh, start, 0]).reshape(BLOCK, BLOCK_D)
        y = YD.load([bh, start, 0]).reshape(BLOCK, BLOCK_D)
    else:
        off = off_bh + rows[:, None] * D + offs_d[None, :]
        if MASKED:
            m = (rows[:, None] < N) & (offs_d[None, :] < D)
            x = tl.load(X + off, mask=m, other=0.0)
            y = tl.load(Y + off, mask=m, other=0.0)
        elif EVEN_D:
            x = tl.load(X + off)
            y = tl.load(Y + off)
        else:
            x = tl.load(X + off, mask=offs_d[None, :] < D, other=0.0)
            y = tl.load(Y + off, mask=offs_d[None, :] < D, other=0.0)
    return x, y


@triton.jit
def _dkdv_stage(dk, dv, k, v, Q, DO, QD, DOD, DQ, bh, Lse, Delta, off_bh, off_row, offs_n, offs_d, N, D, qk_scale,
                scale, lo, hi, rot, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr,
                ATOMIC_DQ: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    if ATOMIC_DQ:                                                     # the loop rotated by rot blocks: key blocks
        span = tl.maximum(tl.cdiv(hi - lo, BLOCK_M), 1) * BLOCK_M     # add to different dq rows at a time
        rot_off = rot * BLOCK_M % span
    for start in range(lo, hi, BLOCK_M):
        if ATOMIC_DQ:
            start_m = lo + (start - lo + rot_off) % span
        else:
            start_m = start
        offs_m = start_m + offs_m0                                    # (BLOCK_M,) query rows
        q, do = _load_pair(Q, DO, QD, DOD, bh, off_bh, start_m, offs_m, offs_d, N, D, BLOCK_M, BLOCK_D, MASKED,
                           EVEN_D, TMA)
        if MASKED:
            row_ok = offs_m < N
            lse2 = tl.load(Lse + off_row + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(Delta + off_row + offs_m, mask=row_ok, other=0.0)
        else:
            lse2 = tl.load(Lse + off_row + offs_m) * 1.4426950408889634
            delta = tl.load(Delta + off_row + offs_m)
        st = tl.dot(k, tl.trans(q), input_precision=PREC, out_dtype=tl.float32)      # (BLOCK_N, BLOCK_M)
        pt = tl.math.exp2(st * qk_scale - lse2[None, :])
        if MASKED:
            valid = offs_m[None, :] < N
            if CAUSAL:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            pt = tl.where(valid, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC, out_dtype=tl.float32)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC, out_dtype=tl.float32)    # (BLOCK_N, BLOCK_M)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = tl.dot(dst, q, dk, input_precision=PREC, out_dtype=tl.float32)
        if ATOMIC_DQ:                                                 # this key block's share of dq, added in fp32
            # keys past N (zero rows of k) out of the sum by a select: their score 0 can exceed a row's lse by
            # more than fp16 holds once exponentiated, and inf times a zero k row would be NaN in every dq row
            dst_q = tl.where(offs_n[:, None] < N, dst, 0.0)
            dq = tl.dot(tl.trans(dst_q), k, input_precision=PREC, out_dtype=tl.float32) * scale
            dq_ptr = DQ + off_bh + offs_m[:, None] * D + offs_d[None, :]
            if MASKED:
                tl.atomic_add(dq_ptr, dq, mask=(offs_m[:, None] < N) & (offs_d[None, :] < D), sem="relaxed")
            elif EVEN_D:
                tl.atomic_add(dq_ptr, dq, sem="relaxed")
            else:
                tl.atomic_add(dq_ptr, dq, mask=offs_d[None, :] < D, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV, DQ, QD, DOD, N, D, qk_scale, scale, BH,
              CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, GROUP_BY_HEAD: tl.constexpr, TMA: tl.constexpr,
              ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PREC: tl.constexpr):
    bh, blk = _program(BH, tl.cdiv(N, BLOCK_N), GROUP_BY_HEAD)
    start_n = blk * BLOCK_N                                           # first key blocks: heaviest causal work
    off_bh = bh.to(tl.int64) * N * D
    off_row = bh.to(tl.int64) * N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    kv_off = off_bh + offs_n[:, None] * D + offs_d[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    n_full = N // BLOCK_M * BLOCK_M                                   # query blocks with no row past N
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M                             # first query block that sees a key here
        diag_hi = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, n_full)
        diag_hi = tl.maximum(diag_hi, lo)
    else:
        lo = 0
        diag_hi = 0
    # diagonal (masked), full blocks past it (no mask; with ATOMIC_DQ each key block starts at its own query
    # block), the N tail (masked)
    dk, dv = _dkdv_stage(dk, dv, k, v, Q, DO, QD, DOD, DQ, bh, Lse, Delta, off_bh, off_row, offs_n, offs_d, N, D,
                         qk_scale, scale, lo, diag_hi, 0, BLOCK_M, BLOCK_D, True, CAUSAL, EVEN_D, PREC, TMA,
                         ATOMIC_DQ)
    dk, dv = _dkdv_stage(dk, dv, k, v, Q, DO, QD, DOD, DQ, bh, Lse, Delta, off_bh, off_row, offs_n, offs_d, N, D,
                         qk_scale, scale, diag_hi, n_full, blk, BLOCK_M, BLOCK_D, False, CAUSAL, EVEN_D, PREC, TMA,
                         ATOMIC_DQ)
    dk, dv = _dkdv_stage(dk, dv, k, v, Q, DO, QD, DOD, DQ, bh, Lse, Delta, off_bh, off_row, offs_n, offs_d, N, D,
                         qk_scale, scale, tl.maximum(n_full, diag_hi), N, 0, BLOCK_M, BLOCK_D, True, CAUSAL, EVEN_D,
                         PREC, TMA, ATOMIC_DQ)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_stage(dq, q, do, lse2, delta, K, V, KD, VD, bh, off_bh, offs_m, offs_d, N, D, qk_scale,
              lo, hi, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              EVEN_D: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n0
        k, v = _load_pair(K, V, KD, VD, bh, off_bh, start_n, cols, offs_d, N, D, BLOCK_N, BLOCK_D, MASKED, EVEN_D,
                          TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=tl.float32)       # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            valid = cols[None, :] < N
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=tl.float32)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC, out_dtype=tl.float32)
    return dq


@triton.jit
def _bwd_dq(Q, K, V, DO, Lse, Delta, DQ, KD, VD, N, D, qk_scale, scale, BH,
            CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, GROUP_BY_HEAD: tl.constexpr, TMA: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    bh, blk = _program(BH, tl.cdiv(N, BLOCK_M), GROUP_BY_HEAD)
    start_m = (tl.cdiv(N, BLOCK_M) - 1 - blk) * BLOCK_M              # last query blocks: heaviest causal work
    off_bh = bh.to(tl.int64) * N * D
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    qm = row_ok[:, None] & (offs_d[None, :] < D)
    q_off = off_bh + offs_m[:, None] * D + offs_d[None, :]
    q = tl.load(Q + q_off, mask=qm, other=0.0)
    do = tl.load(DO + q_off, mask=qm, other=0.0)
    lse2 = tl.load(Lse + bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        lo = start_m // BLOCK_N * BLOCK_N                             # keys left of every row: no mask
        hi = tl.minimum(start_m + BLOCK_M, N)
    else:
        lo = N // BLOCK_N * BLOCK_N
        hi = N
    dq = _dq_stage(dq, q, do, lse2, delta, K, V, KD, VD, bh, off_bh, offs_m, offs_d, N, D, qk_scale,
                   0, lo, BLOCK_N, BLOCK_D, False, CAUSAL, EVEN_D, PREC, TMA)
    dq = _dq_stage(dq, q, do, lse2, delta, K, V, KD, VD, bh, off_bh, offs_m, offs_d, N, D, qk_scale,
                   lo, hi, BLOCK_N, BLOCK_D, True, CAUSAL, EVEN_D, PREC, TMA)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=qm)


@triton.jit
def _bwd_dkdv_ws(Q, K, V, DO, Lse, Delta, DK, DV, N, D, RS, qk_scale, scale, BH,
                 CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, GROUP_BY_HEAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """TMA = 2: the dK/dV kernel as one loop over the query blocks that Triton's Hopper pass warp-specialises
    (as triton_fa2.py's TMA = 2: a producer warp group issuing the copies of q, dO and the row statistics, two
    consumer warp groups of BLOCK_N/2 = 64 keys each). k and v through descriptors of the flat (B*H*N, D) view
    (key rows past N are the next head's: their dk and dv are not stored), q and dO through (1, BLOCK_M, BLOCK_D)
    boxes of the (B*H, N, D) view and lse and delta through (1, BLOCK_M) boxes of the (B*H, N) rows RS apart:
    query rows past N read 0, so they add exactly nothing (p = 1 against a zero dO, ds = 0), and only the
    causal mask is left, one compare a score (query row >= key row), as a select on every block."""
    bh, blk = _program(BH, tl.cdiv(N, BLOCK_N), GROUP_BY_HEAD)
    start_n = blk * BLOCK_N                                           # first key blocks: heaviest causal work
    kd = tl.make_tensor_descriptor(K, shape=[BH * N, D], strides=[D, 1], block_shape=[BLOCK_N, BLOCK_D])
    vd = tl.make_tensor_descriptor(V, shape=[BH * N, D], strides=[D, 1], block_shape=[BLOCK_N, BLOCK_D])
    qd = tl.make_tensor_descriptor(Q, shape=[BH, N, D], strides=[N * D, D, 1], block_shape=[1, BLOCK_M, BLOCK_D])
    dod = tl.make_tensor_descriptor(DO, shape=[BH, N, D], strides=[N * D, D, 1], block_shape=[1, BLOCK_M, BLOCK_D])
    # rows RS apart (a multiple of 4: every box starts 16-byte aligned), N of them (past N: zeros)
    lsed = tl.make_tensor_descriptor(Lse, shape=[BH, N], strides=[RS, 1], block_shape=[1, BLOCK_M])
    deltad = tl.make_tensor_descriptor(Delta, shape=[BH, N], strides=[RS, 1], block_shape=[1, BLOCK_M])
    k = kd.load([bh * N + start_n, 0])
    v = vd.load([bh * N + start_n, 0])
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = start_n // BLOCK_M * BLOCK_M if CAUSAL else 0                # first query block that sees a key here
    for start_m in tl.range(lo, N, BLOCK_M, warp_specialize=True):
        q = qd.load([bh, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        do = dod.load([bh, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        lse2 = lsed.load([bh, start_m]).reshape(BLOCK_M) * 1.4426950408889634
        delta = deltad.load([bh, start_m]).reshape(BLOCK_M)
        st = tl.dot(k, tl.trans(q), input_precision=PREC, out_dtype=tl.float32)      # (BLOCK_N, BLOCK_M)
        pt = tl.math.exp2(st * qk_scale - lse2[None, :])
        if CAUSAL:  # a select, not a product: a masked score's exp2 may be inf
            pt = tl.where(offs_m0[None, :] >= (offs_n - start_m)[:, None], pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC, out_dtype=tl.float32)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC, out_dtype=tl.float32)    # (BLOCK_N, BLOCK_M)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = tl.dot(dst, q, dk, input_precision=PREC, out_dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    kv_off = bh.to(tl.int64) * N * D + offs_n[:, None] * D + offs_d[None, :]
    kv_mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_ws(Q, K, V, DO, Lse, Delta, DQ, N, D, RS, qk_scale, scale, BH, MASK_N: tl.constexpr,
               CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, GROUP_BY_HEAD: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """TMA = 2: the dQ kernel as one warp-specialised loop over key blocks (two consumer warp groups of
    BLOCK_M/2 = 64 query rows each; q and dO through the flat view's descriptors, k and v through
    (1, BLOCK_N, BLOCK_D) boxes). Query rows past N (the next head's, in the flat view) are not stored and no
    row mixes with another, so the masks are one compare a score, as a select on every block: causal, key <=
    row (a valid row's keys past N are past the row); full, key < N where N is not a multiple of BLOCK_N
    (MASK_N): a key past N reads as a zero row, whose score 0 can exceed the row's lse by more than the input
    dtype holds once exponentiated (a row of scores all below -11 in fp16), and inf times its zero k is NaN."""
    bh, blk = _program(BH, tl.cdiv(N, BLOCK_M), GROUP_BY_HEAD)
    start_m = (tl.cdiv(N, BLOCK_M) - 1 - blk) * BLOCK_M              # last query blocks: heaviest causal work
    qd = tl.make_tensor_descriptor(Q, shape=[BH * N, D], strides=[D, 1], block_shape=[BLOCK_M, BLOCK_D])
    dod = tl.make_tensor_descriptor(DO, shape=[BH * N, D], strides=[D, 1], block_shape=[BLOCK_M, BLOCK_D])
    kd = tl.make_tensor_descriptor(K, shape=[BH, N, D], strides=[N * D, D, 1], block_shape=[1, BLOCK_N, BLOCK_D])
    vd = tl.make_tensor_descriptor(V, shape=[BH, N, D], strides=[N * D, D, 1], block_shape=[1, BLOCK_N, BLOCK_D])
    q = qd.load([bh * N + start_m, 0])
    do = dod.load([bh * N + start_m, 0])
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    row_ok = offs_m < N
    # the row statistics through descriptors too (Triton 3.6's and 3.9's pass refuse pointer-loaded ones here),
    # boxes of the flat rows RS apart (a multiple of 4: 16-byte aligned); rows past N read the padding or the
    # next head's, and those rows of dq are not stored. (Not (1, BLOCK_M) boxes of a 2-D view, as in dK/dV:
    # Triton 3.9's pass splits that load between the consumers and then fails on the box's size.)
    lse2 = tl.make_tensor_descriptor(Lse, shape=[BH * RS], strides=[1], block_shape=[BLOCK_M]).load(
        [bh * RS + start_m]) * 1.4426950408889634
    delta = tl.make_tensor_descriptor(Delta, shape=[BH * RS], strides=[1], block_shape=[BLOCK_M]).load(
        [bh * RS + start_m])
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, N) if CAUSAL else N
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        k = kd.load([bh, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = vd.load([bh, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=tl.float32)       # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if CAUSAL:  # a select, not a product: a masked score's exp2 may be inf
            p = tl.where(offs_n0[None, :] <= (offs_m - start_n)[:, None], p, 0.0)
        elif MASK_N:
            p = tl.where(offs_n0[None, :] < N - start_n, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=tl.float32)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC, out_dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    q_off = bh.to(tl.int64) * N * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


def _ensure_allocator():
    """Triton allocates the scratch of descriptors made on the device through the allocator set with
    triton.set_allocator; where none is set, one that takes it from torch on the current CUDA device."""
    try:
        from triton.runtime import _allocation
    except ImportError:
        return
    current = getattr(_allocation, "_allocator", None)
    current = current.get() if hasattr(current, "get") else current
    if current is None or isinstance(current, getattr(_allocation, "NullAllocator", ())):
        triton.set_allocator(_torch_scratch)


def _torch_scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def _pow2_at_least(x, lo):
    return max(lo, triton.next_power_of_2(int(x)))


def _launch(kernel, grid, args, kw, blocks, num_warps, num_stages, ws=None):
    """Launch; on OutOfResources retry with fewer stages, then halved blocks (never below 16).
    grid and args are functions of the blocks (BLOCK_M, BLOCK_N): TMA descriptors carry the block shape.
    ws: a warp-specialised kernel's loop block, "m" or "n" (its num_warps is a consumer warp group's, 4,
    whatever the blocks; its other block is split between the consumers and never shrinks: OutOfResources
    once the loop block is at 16)."""
    bm, bn = blocks
    while True:
        try:
            kernel[grid(bm, bn)](*args(bm, bn), **kw, BLOCK_M=bm, BLOCK_N=bn,
                                 num_warps=num_warps if ws else max(1, min(num_warps, max(bm, bn) // 16)),
                                 num_stages=num_stages)
            return
        except OutOfResources:
            if num_stages > 1:
                num_stages -= 1
            elif ws == "m" and bm > 16:
                bm //= 2
            elif ws == "n" and bn > 16:
                bn //= 2
            elif not ws and max(bm, bn) > 16:
                if bm >= bn:
                    bm //= 2
                else:
                    bn //= 2
            else:
                raise


def run(q, k, v, o, do, lse, causal=True, scale=None):
    if q.dim() != 4 or any(t.shape != q.shape for t in (k, v, o, do)):
        raise ValueError("q, k, v, o, do must all be (B, H, N, D) with one shape")
    if any(t.dtype != q.dtype for t in (k, v, o, do)) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("q, k, v, o, do must share one dtype: float32, float16 or bfloat16")
    B, H, N, D = q.shape
    if lse.shape != (B, H, N):
        raise ValueError("lse must be (B, H, N)")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    q, k, v, o, do = (t.contiguous() for t in (q, k, v, o, do))
    lse = lse.contiguous().to(torch.float32)
    dq, dk, dv = (torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))
    if q.numel() == 0:
        return dq, dk, dv

    p = KERNELTUNE["params"]
    BLOCK_D = _pow2_at_least(D, 16)
    n_pow2 = _pow2_at_least(N, 16)
    bm1, bn1 = min(int(p["BLOCK_M1"]), n_pow2), min(int(p["BLOCK_N1"]), n_pow2)
    bm2, bn2 = min(int(p["BLOCK_M2"]), n_pow2), min(int(p["BLOCK_N2"]), n_pow2)
    num_warps, num_stages = int(p["num_warps"]), int(p["num_stages"])
    if BLOCK_D >= 256 or (q.dtype == torch.float32 and BLOCK_D >= 128):
        bm1, bn1, bm2, bn2 = min(bm1, 32), min(bn1, 64), min(bm2, 64), min(bn2, 32)
        num_stages = min(num_stages, 2)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"           # "tf32" is ignored for fp16/bf16 operands
    even_d = D == BLOCK_D

    # TMA needs 16-byte aligned rows and bases; elsewhere the same kernels load through pointers
    tma = int(p.get("TMA", 0)) if ((D * q.element_size()) % 16 == 0
                                   and all(t.data_ptr() % 16 == 0 for t in (q, k, v, do))) else 0
    if tma == 2 and (bn1 != 128 or bm2 != 128 or q.dtype == torch.float32):
        # the warp-specialised kernels split 128 keys (dK/dV) and 128 query rows (dQ) between their consumers
        # (at 64 both would compute the same rows) and specialise only tensor-core dots (fp32's are not)
        tma = 1
    common = dict(CAUSAL=bool(causal), EVEN_D=even_d, BLOCK_D=BLOCK_D, PREC=prec,
                  GROUP_BY_HEAD=int(p.get("GROUP_BY_HEAD", 1)))
    qk_scale = float(scale) * LOG2E
    if tma == 2:  # the warp-specialised kernels (no atomic dq: their space has none)
        _ensure_allocator()
        # the row statistics in 16-byte aligned boxes: rows RS apart, a multiple of 4, from a 16-byte aligned base
        rs = -(-N // 4) * 4
        delta = torch.empty((B * H, rs), dtype=torch.float32, device=q.device)
        lse_rows = lse.view(B * H, N)
        if rs != N or lse_rows.data_ptr() % 16:
            lse_rows = torch.empty((B * H, rs), dtype=torch.float32, device=q.device)
            lse_rows[:, :N] = lse.view(B * H, N)
        _bwd_delta[(B * H, triton.cdiv(N, 64))](o, do, delta, N, D, rs, BLOCK=64, BLOCK_D=BLOCK_D)
        hyper = (N, D, rs, qk_scale, float(scale), B * H)
        try:
            _launch(_bwd_dkdv_ws, lambda bm, bn: (B * H * triton.cdiv(N, bn),),
                    lambda bm, bn: (q, k, v, do, lse_rows, delta, dk, dv, *hyper), common, (bm1, bn1), num_warps,
                    num_stages, ws="m")
            _launch(_bwd_dq_ws, lambda bm, bn: (B * H * triton.cdiv(N, bm),),
                    lambda bm, bn: (q, k, v, do, lse_rows, delta, dq, *hyper, N % bn != 0), common, (bm2, bn2),  # MASK_N
                    num_warps, num_stages, ws="n")
            return dq, dk, dv
        except OutOfResources:  # the descriptor kernels below, which may take smaller blocks (all recomputed)
            tma = 1
    delta = torch.empty((B * H, N), dtype=torch.float32, device=q.device)
    _bwd_delta[(B * H, triton.cdiv(N, 64))](o, do, delta, N, D, N, BLOCK=64, BLOCK_D=BLOCK_D)
    common["TMA"] = bool(tma)

    def descs(x, y, rows):
        """x and y as TMA descriptors of (1, rows, BLOCK_D) boxes of their (B*H, N, D) views (or as they are)."""
        if not tma:
            return x, y
        return tuple(TensorDescriptor.from_tensor(t.view(B * H, N, D), [1, rows, BLOCK_D]) for t in (x, y))

    atomic = bool(int(p.get("ATOMIC_DQ", 0)))
    # ATOMIC_DQ: the dK/dV kernel adds each key block's share of dq into fp32 (zeroed: a retried launch starts over)
    dq_acc = dq if q.dtype == torch.float32 or not atomic else torch.empty(q.shape, dtype=torch.float32,
                                                                          device=q.device)

    def dkdv_args(bm, bn):
        if atomic:
            dq_acc.zero_()
        return (q, k, v, do, lse, delta, dk, dv, dq_acc, *descs(q, do, bm), N, D, qk_scale, float(scale), B * H)

    _launch(_bwd_dkdv, lambda bm, bn: (B * H * triton.cdiv(N, bn),), dkdv_args, {**common, "ATOMIC_DQ": atomic},
            (bm1, bn1), num_warps, num_stages)
    if atomic:
        if dq_acc is not dq:
            dq.copy_(dq_acc)
        return dq, dk, dv
    _launch(_bwd_dq, lambda bm, bn: (B * H * triton.cdiv(N, bm),),
            lambda bm, bn: (q, k, v, do, lse, delta, dq, *descs(k, v, bn), N, D, qk_scale, float(scale), B * H),
            common, (bm2, bn2), num_warps, num_stages)
    return dq, dk, dv
