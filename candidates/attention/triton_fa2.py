"""Triton FlashAttention-2 forward for Hopper: exp2 with scale·log2(e) folded in, causal diagonal stage apart.

Changes against triton_flash.py (the plain FA2 seed):
- exp2 instead of exp: the scores are scaled by qk_scale = scale·log2(e) inside one FMA
  (s·qk_scale - m), the running max m and the sum l live in the log2 domain.
- causal: the key loop is split in two stages. Stage 1 walks the key blocks wholly left of the query
  block's first row with no mask at all; stage 2 walks the (at most ceil(BLOCK_M/BLOCK_N)+1) blocks on the
  diagonal with the causal mask. Non-causal: stage 1 is every full key block, stage 2 the N tail (if any).
  So the mask is only computed where a score can be masked.
- EVEN_N / EVEN_D (constexpr): no load masks at all when N is a multiple of the blocks and D a power of two.
- one program per (head, query block) on a 1-D grid. GROUP_BY_HEAD = 1 (the default) numbers a head's query
  blocks consecutively, so the programs resident at once are a few heads' blocks, which read the same k and
  v: each head's k/v comes from HBM about once and is then served from L2. GROUP_BY_HEAD = 0 numbers the
  heads consecutively (every resident program on another head): when B*H exceeds the programs resident at
  once, each program streams its head's k/v from HBM, ceil(N/BLOCK_M)·B·H·N·D·4 bytes in all (2 GB at
  N = 2048, D = 128, 16k tokens: 0.7 ms of an H100's bandwidth, most of that shape's run time).
  Within a head the query blocks go in reverse, so the heaviest causal blocks (the last rows, the longest
  key loop) start first and the short ones fill the tail.
- run_with_lse(q, k, v, causal, scale) -> (out, lse): lse is the fp32 (B, H, N) natural-log logsumexp of the
  scaled, masked scores (the row statistic a backward pass needs): lse = (m + log2 l)·ln 2.

Algorithm, one program per (batch*head, query block of BLOCK_M rows):

    m = -inf, l = 0, acc = 0                        # (BLOCK_M,), (BLOCK_M,), (BLOCK_M, BLOCK_D) fp32
    for key block in stage 1 (no mask), then stage 2 (masked):
        s   = q @ k^T                               # (BLOCK_M, BLOCK_N) fp32 accumulate, unscaled
        m'  = max(m, rowmax(s)·qk_scale);  a = exp2(m - m');  p = exp2(s·qk_scale - m')
        l   = a·l + rowsum(p);  acc = a·acc + p @ v  # p rounded to the input dtype for the tensor cores
    out = acc / l;  lse = (m + log2 l)·ln 2

Work: FLOPs 4·B·H·N²·D (half when causal); HBM: q, o once; k, v once per query block (mostly L2 hits).
fp32 inputs use input_precision="ieee" (fp32 accuracy); fp16/bf16 use the tensor cores, fp32 accumulate.
Runs on CUDA and under the Triton CPU interpreter (TRITON_INTERPRET=1; fp32/fp16 there).

Template knobs (KERNELTUNE["space"], read at call time):
- BLOCK_M, BLOCK_N: query rows per program, keys per inner step.
- num_warps, num_stages: warps per program, software-pipelining depth of the k/v loads (GPU only).
- GROUP_BY_HEAD: the program order above (1: a head's blocks together; 0: heads interleaved).
- TMA: 1 loads k and v through host-made tensor descriptors of the (B*H, N, D) view, (1, BLOCK_N, BLOCK_D)
  boxes (Hopper's tensor memory accelerator: one thread issues a whole tile's copy, no address registers,
  out-of-bounds rows and columns read as zeros, so no load masks); Triton lowers it to pointer loads on
  older GPUs and in the interpreter. Used only where rows and bases are 16-byte aligned (D·itemsize % 16 = 0).
  2 runs the warp-specialised kernel (_fa2_fwd_ws): q, k and v through descriptors made in the kernel, one
  key loop with tl.range(..., warp_specialize=True), the masks as selects on every block where one can apply
  (causal: one compare a score, key <= row; full: key < N, only where N is not a multiple of BLOCK_N). That is
  the form Triton's Hopper pass takes (3.6 and 3.9, sm90): it splits the program into a producer warp group,
  which issues the tensor-memory copies into a ring of num_stages buffers, and two consumer warp groups of
  BLOCK_M/2 query rows each, with their own register budgets (setmaxnreg): the copies, the dots and the
  exponentials of the two halves overlap, as in FlashAttention-3. num_warps = 4 is a consumer group's size
  (the program runs 12 warps); two loops, a branch in the loop or a pointer-loaded q and the pass refuses or
  skips the loop (benchmarks/gpu/compile_check.py reports "warp-specialised"). BLOCK_M = 128 only: the pass
  splits no smaller block, and at 64 both consumer groups compute the same 64 rows (in the TTGIR each
  partition holds the whole 64-row tile), so at run time a block clamped below 128 rows (N < 128, or an
  OutOfResources retry) and fp32 inputs (whose dots are not on the tensor cores, so nothing is specialised)
  take the TMA = 1 kernel. The descriptors' scratch comes from an allocator this file sets where none is.
- PIPE: 1 computes the next key block's scores (q @ k^T) before this block's softmax, so that the
  asynchronous tensor-core dot can overlap the exponentials (which, at D = 128, cost about half as long as
  the block's two dots on an H100's special-function units); one more (BLOCK_M, BLOCK_N) fp32 tile lives in
  registers.
- WS (a param, not in the search space): 1 marks the two-stage kernel's key loops warp_specialize=True. Ignored
  with PIPE. For sm90, Triton 3.6 and 3.9 mark the loops and then emit the same PTX as without it (host-made
  descriptors, two loops: benchmarks/gpu/compile_check.py); the warp-specialised forward is TMA = 2.
Restrictions: BLOCK_M >= BLOCK_N (the diagonal stage is one or two key blocks); BLOCK_M·BLOCK_N <=
2048·num_warps (at most 64 fp32 scores per thread); BLOCK_M <= 16·num_warps and, with PIPE, BLOCK_M·BLOCK_N <=
1024·num_warps (compiled for sm90 at D = 128 with Triton 3.6, benchmarks/gpu/compile_check.py, every point:
BLOCK_M = 128 on 4 warps spilled 8-2700 B a thread at every BLOCK_N, and PIPE's second score tile at 128x128
on 8 warps 40-80 B; no other point spilled); the first two do not bind TMA = 2, whose consumers are two warp
groups of 4 (no point of its space spilled), which takes num_warps = 4, no PIPE, a head's blocks together and
BLOCK_M = 128; (BLOCK_M + 2·BLOCK_N·num_stages)·256 <= 200 KiB (q plus the k/v ring at D=128, 2-byte inputs, in an H100's
227 KiB of shared memory). At run time blocks are clamped to the padded N, and for D > 128 or fp32 inputs to
BLOCK_N <= 64 / BLOCK_M <= 64; an OutOfResources retries with fewer stages, then smaller blocks.
"""
import math

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources
from triton.tools.tensor_descriptor import TensorDescriptor

KERNELTUNE = {
    "op": "attention",
    "backend": "triton",
    "params": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "GROUP_BY_HEAD": 1, "TMA": 0,
               "PIPE": 0, "WS": 0},
    "space": {
        "BLOCK_M": [64, 128],
        "BLOCK_N": [32, 64, 128],
        "num_warps": [4, 8],
        "num_stages": [2, 3, 4, 5],
        "GROUP_BY_HEAD": [1, 0],
        "TMA": [0, 1, 2],
        "PIPE": [0, 1],
    },
    "restrictions": [
        "BLOCK_M >= BLOCK_N",
        "BLOCK_M * BLOCK_N <= 2048 * num_warps or TMA == 2",
        "(BLOCK_M + 2 * BLOCK_N * num_stages) * 256 <= 204800",
        "BLOCK_M <= 16 * num_warps or TMA == 2",
        "PIPE == 0 or BLOCK_M * BLOCK_N <= 1024 * num_warps",
        "TMA != 2 or (num_warps == 4 and PIPE == 0 and GROUP_BY_HEAD == 1 and BLOCK_M == 128)",
    ],
}

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


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
def _load_tile(X, XD, bh, off_bh, stride_n, start_n, offs_n, offs_d, N, D, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, MASKED: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
               TMA: tl.constexpr):
    """The (BLOCK_N, BLOCK_D) tile of k or v whose first row is start_n; rows past N, columns past D read 0."""
    if TMA:   # a (1, BLOCK_N, BLOCK_D) box of the (B*H, N, D) view: out-of-bounds rows and columns read as 0
        x = XD.load([bh, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        cols = start_n + offs_n
        off = off_bh + cols[:, None] * stride_n + offs_d[None, :]
        if MASKED and not EVEN_N:
            if EVEN_D:
                x = tl.load(X + off, mask=cols[:, None] < N, other=0.0)
            else:
                x = tl.load(X + off, mask=(cols[:, None] < N) & (offs_d[None, :] < D), other=0.0)
        elif EVEN_D:
            x = tl.load(X + off)
        else:
            x = tl.load(X + off, mask=offs_d[None, :] < D, other=0.0)
    return x


@triton.jit
def _online_softmax_pv(acc, l_i, m_i, s, v, cols, offs_m, N, qk_scale,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """One key block's scores s (BLOCK_M, BLOCK_N, unscaled) into the running max m, sum l and acc += p @ v."""
    if MASKED:
        valid = cols[None, :] < N
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
    return _softmax_pv(acc, l_i, m_i, s, v, qk_scale, PREC)


@triton.jit
def _softmax_pv(acc, l_i, m_i, s, v, qk_scale, PREC: tl.constexpr):
    """The online-softmax update of _online_softmax_pv, with s already masked."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)                          # 0 on the first block (m_i = -inf)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])             # (BLOCK_M, BLOCK_N) fp32
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC, out_dtype=tl.float32)
    return acc, l_i, m_new


@triton.jit
def _fa2_stage(acc, l_i, m_i, q, K, V, KD, VD, bh, off_bh, stride_n, offs_m, offs_n, offs_d, N, D, qk_scale,
               lo, hi, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
               PREC: tl.constexpr, TMA: tl.constexpr, PIPE: tl.constexpr, WS: tl.constexpr):
    if PIPE:
        # the next block's q @ k^T is issued before this block's softmax, so the tensor cores have work while
        # the exponentials run (the first block's scores before the loop, the last block's softmax after it)
        n_iter = tl.cdiv(hi - lo, BLOCK_N)
        if n_iter > 0:
            last = lo + (n_iter - 1) * BLOCK_N
            k = _load_tile(K, KD, bh, off_bh, stride_n, lo, offs_n, offs_d, N, D, BLOCK_N, BLOCK_D, MASKED, EVEN_N,
                           EVEN_D, TMA)
            s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=tl.float32)
            for start_n in range(lo, last, BLOCK_N):
                k = _load_tile(K, KD, bh, off_bh, stride_n, start_n + BLOCK_N, offs_n, offs_d, N, D, BLOCK_N,
                               BLOCK_D, MASKED, EVEN_N, EVEN_D, TMA)
                s_next = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=tl.float32)
                v = _load_tile(V, VD, bh, off_bh, stride_n, start_n, offs_n, offs_d, N, D, BLOCK_N, BLOCK_D,
                               MASKED, EVEN_N, EVEN_D, TMA)
                acc, l_i, m_i = _online_softmax_pv(acc, l_i, m_i, s, v, start_n + offs_n, offs_m, N, qk_scale,
                                                   MASKED, CAUSAL, PREC)
                s = s_next
            v = _load_tile(V, VD, bh, off_bh, stride_n, last, offs_n, offs_d, N, D, BLOCK_N, BLOCK_D, MASKED,
                           EVEN_N, EVEN_D, TMA)
            acc, l_i, m_i = _online_softmax_pv(acc, l_i, m_i, s, v, last + offs_n, offs_m, N, qk_scale,
                                               MASKED, CAUSAL, PREC)
    else:
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
            k = _load_tile(K, KD, bh, off_bh, stride_n, start_n, offs_n, offs_d, N, D, BLOCK_N, BLOCK_D, MASKED,
                           EVEN_N, EVEN_D, TMA)
            v = _load_tile(V, VD, bh, off_bh, stride_n, start_n, offs_n, offs_d, N, D, BLOCK_N, BLOCK_D, MASKED,
                           EVEN_N, EVEN_D, TMA)
            s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=tl.float32)   # (BLOCK_M, BLOCK_N)
            acc, l_i, m_i = _online_softmax_pv(acc, l_i, m_i, s, v, start_n + offs_n, offs_m, N, qk_scale,
                                               MASKED, CAUSAL, PREC)
    return acc, l_i, m_i


@triton.jit
def _store_out_lse(Out, Lse, acc, l_i, m_i, bh, off_bh, stride_n, offs_m, offs_d, N, D, STORE_LSE: tl.constexpr,
                   EVEN_N: tl.constexpr, EVEN_D: tl.constexpr):
    """out = acc / l into the query block's rows (those past N and columns past D left alone), and the rows'
    natural-log logsumexp where asked: lse = (m + log2 l)·ln 2."""
    out = acc * (1.0 / l_i)[:, None]                                 # a reciprocal per row, not a divide per element
    o_off = off_bh + offs_m[:, None] * stride_n + offs_d[None, :]
    if EVEN_N and EVEN_D:
        tl.store(Out + o_off, out.to(Out.dtype.element_ty))
    else:
        tl.store(Out + o_off, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_d[None, :] < D))
    if STORE_LSE:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453        # natural log
        lse_off = bh.to(tl.int64) * N + offs_m
        if EVEN_N:
            tl.store(Lse + lse_off, lse)
        else:
            tl.store(Lse + lse_off, lse, mask=offs_m < N)


@triton.jit
def _fa2_fwd(
    Q, K, V, Out, Lse, KD, VD,
    stride_bh, stride_n,
    N, D, qk_scale, BH,
    CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, GROUP_BY_HEAD: tl.constexpr, TMA: tl.constexpr, PIPE: tl.constexpr, WS: tl.constexpr,
):
    bh, blk = _program(BH, tl.cdiv(N, BLOCK_M), GROUP_BY_HEAD)
    start_m = tl.cdiv(N, BLOCK_M) - 1 - blk                         # heaviest causal blocks first
    off_bh = bh.to(tl.int64) * stride_bh                             # int64: B*H*N*D may exceed 2**31
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)              # (BLOCK_M,) query rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_off = off_bh + offs_m[:, None] * stride_n + offs_d[None, :]
    if EVEN_N and EVEN_D:
        q = tl.load(Q + q_off)
    else:
        q = tl.load(Q + q_off, mask=(offs_m[:, None] < N) & (offs_d[None, :] < D), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        lo = (start_m * BLOCK_M) // BLOCK_N * BLOCK_N               # keys left of every row: no mask
        hi = tl.minimum((start_m + 1) * BLOCK_M, N)
    else:
        lo = N // BLOCK_N * BLOCK_N                                 # full key blocks: no mask
        hi = N
    acc, l_i, m_i = _fa2_stage(acc, l_i, m_i, q, K, V, KD, VD, bh, off_bh, stride_n, offs_m, offs_n, offs_d, N, D,
                               qk_scale, 0, lo, BLOCK_N, BLOCK_D, False, CAUSAL, EVEN_N, EVEN_D, PREC, TMA, PIPE, WS)
    acc, l_i, m_i = _fa2_stage(acc, l_i, m_i, q, K, V, KD, VD, bh, off_bh, stride_n, offs_m, offs_n, offs_d, N, D,
                               qk_scale, lo, hi, BLOCK_N, BLOCK_D, True, CAUSAL, EVEN_N, EVEN_D, PREC, TMA, PIPE, WS)

    _store_out_lse(Out, Lse, acc, l_i, m_i, bh, off_bh, stride_n, offs_m, offs_d, N, D, STORE_LSE, EVEN_N, EVEN_D)


@triton.jit
def _fa2_fwd_ws(
    Q, K, V, Out, Lse,
    stride_bh, stride_n,
    N, D, qk_scale, BH,
    CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    MASK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, GROUP_BY_HEAD: tl.constexpr,
):
    """TMA = 2: the forward as one key loop that Triton's Hopper pass warp-specialises (a producer warp group
    issuing the tensor-memory copies, two consumer warp groups of BLOCK_M/2 query rows each: BLOCK_M = 128, since
    the pass splits no smaller block and both groups would compute the same 64 rows). What that pass takes
    (Triton 3.6 and 3.9, sm90): q, k and v through descriptors made here, one loop, and no branch in it, so the
    masks are selects on every block where one can apply, one compare each: causal, key ≤ row (a valid row's
    keys past N are past the row too; rows past N are not stored, and their zero-filled keys give finite
    scores); full, key < N only where N is not a multiple of BLOCK_N (MASK_N)."""
    bh, blk = _program(BH, tl.cdiv(N, BLOCK_M), GROUP_BY_HEAD)
    start_m = tl.cdiv(N, BLOCK_M) - 1 - blk                         # heaviest causal blocks first
    # q through the flat (B*H*N, D) view: rows past N are the next head's (their outputs are not stored);
    # Triton 3.9's pass refuses a 3-D q box here, 3.6's pointer-loaded q
    qd = tl.make_tensor_descriptor(Q, shape=[BH * N, D], strides=[stride_n, 1], block_shape=[BLOCK_M, BLOCK_D])
    kd = tl.make_tensor_descriptor(K, shape=[BH, N, D], strides=[stride_bh, stride_n, 1],
                                   block_shape=[1, BLOCK_N, BLOCK_D])
    vd = tl.make_tensor_descriptor(V, shape=[BH, N, D], strides=[stride_bh, stride_n, 1],
                                   block_shape=[1, BLOCK_N, BLOCK_D])
    q = qd.load([bh * N + start_m * BLOCK_M, 0])                    # columns past D (and rows past B*H*N): 0
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = tl.minimum((start_m + 1) * BLOCK_M, N) if CAUSAL else N
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        k = kd.load([bh, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = vd.load([bh, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=tl.float32)
        # the masks as selects: a branch in the loop stops the warp specialisation
        if CAUSAL:
            s = tl.where(offs_n[None, :] <= (offs_m - start_n)[:, None], s, float("-inf"))
        elif MASK_N:
            s = tl.where(offs_n[None, :] < N - start_n, s, float("-inf"))
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, v, qk_scale, PREC)

    _store_out_lse(Out, Lse, acc, l_i, m_i, bh, bh.to(tl.int64) * stride_bh, stride_n, offs_m, offs_d, N, D, STORE_LSE,
                   EVEN_N, EVEN_D)


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


def _forward(q, k, v, causal, scale, want_lse):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError("q, k, v must all be (B, H, N, D) with one shape")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("q, k, v must share one dtype: float32, float16 or bfloat16")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    B, H, N, D = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scale = float(scale)
    if scale < 0:       # the kernels mask with -inf before scaling and take max(s)·scale as the row's max
        q, scale = -q, -scale
    elif scale == 0:    # every score 0: a uniform softmax over the keys each row sees
        q, scale = torch.zeros_like(q), 1.0
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device) if want_lse else out
    if out.numel() == 0:
        return out, lse

    p = KERNELTUNE["params"]
    BLOCK_D = _pow2_at_least(D, 16)
    n_pow2 = _pow2_at_least(N, 16)
    BLOCK_M = min(int(p["BLOCK_M"]), n_pow2)
    BLOCK_N = min(int(p["BLOCK_N"]), BLOCK_M)
    num_warps, num_stages = int(p["num_warps"]), int(p["num_stages"])
    if BLOCK_D >= 256 or (q.dtype == torch.float32 and BLOCK_D >= 128):
        BLOCK_M, BLOCK_N = min(BLOCK_M, 64), min(BLOCK_N, 32)
        num_stages = min(num_stages, 2)
    num_warps = max(1, min(num_warps, BLOCK_M // 16))
    group = int(p.get("GROUP_BY_HEAD", 1))
    # TMA needs 16-byte aligned rows and bases; elsewhere the same kernel loads through pointers
    tma = int(p.get("TMA", 0)) if ((D * q.element_size()) % 16 == 0
                                   and all(t.data_ptr() % 16 == 0 for t in (q, k, v))) else 0
    if tma == 2:  # descriptors made on the device take a global scratch, which Triton asks an allocator for
        _ensure_allocator()
    prec = "ieee" if q.dtype == torch.float32 else "tf32"          # "tf32" is ignored for fp16/bf16 operands
    while True:
        if tma == 2 and (BLOCK_M != 128 or q.dtype == torch.float32):
            # the warp-specialised kernel splits 128 query rows between its consumers (at 64 both would compute
            # the same rows) and specialises only tensor-core dots (fp32's are not): the descriptor kernel then
            tma = 1
        try:
            grid = (B * H * triton.cdiv(N, BLOCK_M),)
            kd, vd = ((TensorDescriptor.from_tensor(t.view(B * H, N, D), [1, BLOCK_N, BLOCK_D]) for t in (k, v))
                      if tma == 1 else (k, v))
            if tma == 2:
                _fa2_fwd_ws[grid](
                    q, k, v, out, lse,
                    N * D, D,
                    N, D, float(scale) * LOG2E, B * H,
                    CAUSAL=bool(causal), STORE_LSE=bool(want_lse),
                    EVEN_N=(N % BLOCK_M == 0 and N % BLOCK_N == 0), EVEN_D=(D == BLOCK_D),
                    MASK_N=N % BLOCK_N != 0,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PREC=prec, GROUP_BY_HEAD=group,
                    num_warps=num_warps, num_stages=num_stages,
                )
                return out, lse
            _fa2_fwd[grid](
                q, k, v, out, lse, kd, vd,
                N * D, D,
                N, D, float(scale) * LOG2E, B * H,
                CAUSAL=bool(causal), STORE_LSE=bool(want_lse),
                EVEN_N=(N % BLOCK_M == 0 and N % BLOCK_N == 0), EVEN_D=(D == BLOCK_D),
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                PREC=prec, GROUP_BY_HEAD=group, TMA=tma, PIPE=bool(int(p.get("PIPE", 0))),
                WS=bool(int(p.get("WS", 0))) and not int(p.get("PIPE", 0)),
                num_warps=num_warps, num_stages=num_stages,
            )
            return out, lse
        except OutOfResources:
            if num_stages > 1:
                num_stages -= 1
            elif BLOCK_N > 16:
                BLOCK_N //= 2
            elif BLOCK_M > 16:
                BLOCK_M //= 2
                num_warps = max(1, min(num_warps, BLOCK_M // 16))
            else:
                raise


def run(q, k, v, causal=True, scale=None):
    return _forward(q, k, v, causal, scale, False)[0]


def run_with_lse(q, k, v, causal=True, scale=None):
    """(out, lse): lse (B, H, N) fp32, natural-log logsumexp of the scaled, masked scores of each row."""
    return _forward(q, k, v, causal, scale, True)
