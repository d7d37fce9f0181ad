"""Triton FlashAttention forward: online softmax in fp32, causal key loop stops at the diagonal.

Algorithm (FlashAttention-2 forward), one program per (query block of BLOCK_M rows, batch*head):

    m = -inf, l = 0, acc = 0                                   # (BLOCK_M,), (BLOCK_M,), (BLOCK_M, BLOCK_D) fp32
    for key block start_n in [0, hi) step BLOCK_N:             # causal: hi = min(N, (start_m+1)*BLOCK_M)
        s   = (q @ k^T) * scale                                # (BLOCK_M, BLOCK_N), fp32 accumulate
        s[j >= N or (causal and j > i)] = -inf
        m'  = max(m, rowmax(s));  a = exp(m - m');  p = exp(s - m')
        l   = a*l + rowsum(p);    acc = a*acc + p @ v          # (BLOCK_M, BLOCK_D)
    out = acc / l                                              # rounded once to the input dtype

Shapes: q, k, v, out are (B, H, N, D) contiguous, addressed as (B*H, N, D) with strides (N*D, D, 1).
BLOCK_D = next power of two >= max(D, 16); the D tail is masked (loaded as 0, never stored).
Rows i >= N and keys j >= N are masked. Key 0 is visible to every row and lies in the first key block,
so the running max is finite after the first iteration: no NaN, even for padded rows.
FLOPs: 4*B*H*N*N*D (non-causal), ~half causal. HBM traffic: q, out once; k, v once per query block:
(2 + 2*ceil(N/BLOCK_M)) * B*H*N*D*elem_size bytes (mostly L2 hits on a GPU).
fp32 inputs use input_precision="ieee" (no TF32) in both dots; fp16/bf16 inputs use the tensor cores for
q@k^T and cast p to the input dtype for p@v (standard flash practice), always accumulating in fp32.
Runs on CUDA and under the Triton CPU interpreter (TRITON_INTERPRET=1; fp32/fp16 there).

Template knobs (KERNELTUNE["space"]; read from KERNELTUNE["params"] at call time):
- BLOCK_M: query rows per program (a 1-D grid of ceil(N/BLOCK_M)·B·H programs, a head's blocks consecutive,
  so B·H is not bound by CUDA's 65535 limit on the grid's second axis); k, v are re-read once per query block.
- BLOCK_N: keys per inner iteration; the (BLOCK_M, BLOCK_N) fp32 score tile lives in registers.
- num_warps: warps per program (GPU only; the interpreter ignores it).
- num_stages: software-pipelining depth of the k/v loads (GPU only; the interpreter ignores it).
Restrictions (every valid point satisfies them):
- BLOCK_M >= 8*num_warps: no warp without query rows to own in the dots.
- BLOCK_M*BLOCK_N <= 2048*num_warps: at most 64 fp32 scores per thread (register spills otherwise).
- (BLOCK_M + 2*BLOCK_N*num_stages) * 128 * 2 <= 192 KiB: q tile plus num_stages k and v tiles in shared
  memory at D=128 with 2-byte inputs (the timed GPU configuration) fit an H100 SM.
At run time the block sizes are clamped to the padded sequence length, BLOCK_N <= 64 when BLOCK_D = 128,
and BLOCK_M <= 64, BLOCK_N <= 32, num_stages = 1 when BLOCK_D = 256 (fp32 or D up to 256 would otherwise
overflow shared memory / registers); if the compiler still reports OutOfResources, the launch is retried
with num_stages = 1, then halved BLOCK_N, then halved BLOCK_M (down to 16), so every point runs everywhere.
"""
import math

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

KERNELTUNE = {
    "op": "attention",
    "backend": "triton",
    "params": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    "space": {
        "BLOCK_M": [16, 32, 64, 128],
        "BLOCK_N": [16, 32, 64, 128],
        "num_warps": [2, 4, 8],
        "num_stages": [1, 2, 3, 4],
    },
    "restrictions": [
        "BLOCK_M >= 8 * num_warps",
        "BLOCK_M * BLOCK_N <= 2048 * num_warps",
        "(BLOCK_M + 2 * BLOCK_N * num_stages) * 256 <= 196608",
    ],
}


@triton.jit
def _flash_fwd(
    Q, K, V, Out,
    stride_bh, stride_n,
    N, D, scale,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    n_blocks = tl.cdiv(N, BLOCK_M)
    start_m = tl.program_id(0) % n_blocks
    off_bh = (tl.program_id(0) // n_blocks).to(tl.int64) * stride_bh  # int64: B*H*N*D may exceed 2**31
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)          # (BLOCK_M,) query rows
    offs_n = tl.arange(0, BLOCK_N)                              # (BLOCK_N,) key columns in a block
    offs_d = tl.arange(0, BLOCK_D)                              # (BLOCK_D,)
    mask_m = offs_m < N
    mask_d = offs_d < D

    q_ptrs = Q + off_bh + offs_m[:, None] * stride_n + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)   # (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        hi = tl.minimum((start_m + 1) * BLOCK_M, N)             # causal block skipping
    else:
        hi = N
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n                                 # (BLOCK_N,)
        mask_n = cols < N
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + off_bh + cols[:, None] * stride_n + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + off_bh + cols[:, None] * stride_n + offs_d[None, :], mask=kv_mask, other=0.0)
        # (BLOCK_M, BLOCK_D) @ (BLOCK_D, BLOCK_N): 2*BLOCK_M*BLOCK_N*BLOCK_D FLOP
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=tl.float32) * scale
        valid = mask_n[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)                             # 0 on the first block (m_i = -inf)
        p = tl.exp(s - m_new[:, None])                          # (BLOCK_M, BLOCK_N) fp32
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        # (BLOCK_M, BLOCK_N) @ (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC, out_dtype=tl.float32)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = Out + off_bh + offs_m[:, None] * stride_n + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _pow2_at_least(x, lo):
    return max(lo, triton.next_power_of_2(int(x)))


def run(q, k, v, causal=True, scale=None):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError("q, k, v must all be (B, H, N, D) with one shape")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("q, k, v must share one dtype: float32, float16 or bfloat16")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    B, H, N, D = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out

    p = KERNELTUNE["params"]
    BLOCK_D = _pow2_at_least(D, 16)
    # never bigger than the (padded) sequence; tl.dot needs every dim >= 16
    n_pow2 = _pow2_at_least(N, 16)
    BLOCK_M = min(int(p["BLOCK_M"]), n_pow2)
    BLOCK_N = min(int(p["BLOCK_N"]), n_pow2)
    num_warps, num_stages = int(p["num_warps"]), int(p["num_stages"])
    if BLOCK_D >= 256:                                          # keep registers / shared memory in budget
        BLOCK_M, BLOCK_N = min(BLOCK_M, 64), min(BLOCK_N, 32)
        num_stages = min(num_stages, 1)
    elif BLOCK_D >= 128:
        BLOCK_N = min(BLOCK_N, 64)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"       # "tf32" is ignored for fp16/bf16 operands
    while True:
        try:
            grid = (triton.cdiv(N, BLOCK_M) * B * H,)
            _flash_fwd[grid](
                q, k, v, out,
                N * D, D,
                N, D, float(scale),
                CAUSAL=bool(causal),
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                PREC=prec,
                num_warps=num_warps, num_stages=num_stages,
            )
            return out
        except OutOfResources:
            # shared memory / registers over budget for this D and dtype: shrink, never fail
            if num_stages > 1:
                num_stages = 1
            elif BLOCK_N > 16:
                BLOCK_N //= 2
            elif BLOCK_M > 16:
                BLOCK_M //= 2
                num_warps = max(1, min(num_warps, BLOCK_M // 8))
            else:
                raise
