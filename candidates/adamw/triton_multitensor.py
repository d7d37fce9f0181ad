"""Triton multi-tensor AdamW: ONE kernel launch updates every tensor, via a device table of pointers.

Algorithm (decoupled weight decay, bias correction, 1-based ``step``), per element:

    p  <- p * (1 - lr*wd)
    m  <- b1*m + (1-b1)*g
    v  <- b2*v + (1-b2)*g*g
    p  <- p - (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)      bc1 = 1-b1**step, bc2 = 1-b2**step

Multi-tensor apply: the host builds one int64 table on the device (one host->device copy):

    ptrs   (T, 4)  data_ptr() of p, g, m, v of tensor t
    numel  (T,)
    chunk_tensor (C,), chunk_start (C,)    every tensor cut into chunks of CHUNK elements
    4 slots: the float64 bits of b1, 1-b1, b2, 1-b2

and launches a 1-D grid over the C chunks. Program c loads its tensor index and start offset, loads the
four base pointers from the table, casts them with ``.to(tl.pointer_type(tl.float32))`` and streams
CHUNK elements in BLOCK-wide vectors with tail masks. Memory traffic: 28 B/element
(read p, g, m, v; write p, m, v) + 48 B of table per chunk; ~15 FLOP/element: bandwidth bound.
Host scalars (1-lr*wd, lr/bc1, sqrt(bc2)) are computed in float64 and passed as fp32.
m and v are updated in fp64 (b1, 1-b1, b2, 1-b2 as fp64 scalars) and rounded once to fp32, so the stored
moments are correctly rounded; free here because the kernel is bandwidth bound. The parameter step is
fp32 with the IEEE round-to-nearest sqrt and division (tl.sqrt_rn, tl.div_rn), in torch's order.
Works on CUDA and under the Triton CPU interpreter (TRITON_INTERPRET=1, CPU tensors).

Template knobs (KERNELTUNE["space"]; read from KERNELTUNE["params"] at call time):
- BLOCK: elements per vector step of a program (BLOCK/(32*num_warps) per thread, per tensor).
- CHUNK: elements per program (grid = sum over tensors of ceil(numel/CHUNK)); a program stops at the end
  of its tensor, so a small tensor costs one step. Small CHUNK: more programs and 48 B of table each;
  large CHUNK: fewer, longer programs (tail imbalance on a GPU).
- num_warps: warps per program (GPU only; the interpreter ignores it).
Restrictions: BLOCK <= CHUNK <= 64*BLOCK (a smaller CHUNK is rounded up to BLOCK: a duplicate point);
128*num_warps <= BLOCK <= 1024*num_warps: 4 to 32 fp32 per thread and tensor (one 128-bit access at
least, without register spills of the fp64 moment math).
All tensors always go in ONE launch: splitting the table into several launches only adds launch latency.
"""
import numpy as np
import torch
import triton
import triton.language as tl

KERNELTUNE = {
    "op": "adamw",
    "backend": "triton",
    "params": {"BLOCK": 1024, "CHUNK": 16384, "num_warps": 4},
    "space": {
        "BLOCK": [256, 512, 1024, 2048, 4096],
        "CHUNK": [2048, 4096, 8192, 16384, 32768, 65536],
        "num_warps": [1, 2, 4, 8, 16],
    },
    "restrictions": ["CHUNK >= BLOCK", "CHUNK <= 64 * BLOCK", "BLOCK >= 128 * num_warps", "BLOCK <= 1024 * num_warps"],
}


@triton.jit
def _adamw_multi(
    table,                      # int64: [ptrs (T*4) | numel (T) | chunk_tensor (C) | chunk_start (C) | 4 fp64 bits]
    T, C,
    decay, step_size, bc2_sqrt, eps,            # fp32 scalars
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(table + T * 5 + c)                      # which tensor this chunk belongs to
    start = tl.load(table + T * 5 + C + c)              # first element of the chunk (int64)
    n = tl.load(table + T * 4 + t)                      # numel of tensor t
    p_ptr = tl.load(table + t * 4 + 0).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(table + t * 4 + 1).to(tl.pointer_type(tl.float32))
    m_ptr = tl.load(table + t * 4 + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(table + t * 4 + 3).to(tl.pointer_type(tl.float32))
    # fp64 b1, 1-b1, b2, 1-b2 travel in the table as raw bits
    sc = table + T * 5 + 2 * C
    b1 = tl.load(sc + 0).to(tl.float64, bitcast=True)
    omb1 = tl.load(sc + 1).to(tl.float64, bitcast=True)
    b2 = tl.load(sc + 2).to(tl.float64, bitcast=True)
    omb2 = tl.load(sc + 3).to(tl.float64, bitcast=True)
    offs0 = tl.arange(0, BLOCK)
    hi = tl.minimum(n - start, CHUNK)                   # the last chunk of a tensor stops at its end
    for i in range(0, hi, BLOCK):
        offs = start + i + offs0                        # (BLOCK,) int64
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        # moments in fp64, rounded once: correctly rounded even when b1*m and (1-b1)*g cancel
        gd = g.to(tl.float64)
        m = (b1 * m.to(tl.float64) + omb1 * gd).to(tl.float32)
        v = (b2 * v.to(tl.float64) + omb2 * gd * gd).to(tl.float32)
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p * decay - tl.div_rn(step_size * m, denom)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    T = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == T):
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs must have equal length")
    step = int(step)
    if step < 1:
        raise ValueError("step is 1-based")
    if T == 0:
        return None
    dev = params[0].device
    pars = KERNELTUNE["params"]
    BLOCK, CHUNK, num_warps = int(pars["BLOCK"]), int(pars["CHUNK"]), int(pars["num_warps"])
    CHUNK = max(BLOCK, (CHUNK // BLOCK) * BLOCK)

    # one pass per list and property (the host side of a step over 4 x 148 tensors is paid every step)
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    shapes = [p.shape for p in params]
    for j, lst in enumerate(lists):
        if any(x.dtype != torch.float32 or x.device != dev for x in lst):
            raise TypeError("all tensors must be float32 on one device")
        if j and [x.shape for x in lst] != shapes:
            raise ValueError("tensor i of every list must have one shape")
    # contiguous is the contract; anything else goes through a copy, written back after the kernel
    writeback = []
    cols = []
    for j, lst in enumerate(lists):
        if all(x.is_contiguous() for x in lst):
            cols.append(lst)
            continue
        col = []
        for x in lst:
            y = x if x.is_contiguous() else x.detach().contiguous()
            if y is not x and j != 1:
                writeback.append((x, y))
            col.append(y)
        cols.append(col)
    work = list(zip(*cols))  # rows (p, g, m, v)

    numels = np.array([r[0].numel() for r in work], dtype=np.int64)
    nchunks = (numels + CHUNK - 1) // CHUNK
    C = int(nchunks.sum())
    if C == 0:
        return None
    ptrs = np.array([[x.data_ptr() for x in r] for r in work], dtype=np.uint64).view(np.int64)  # (T, 4)
    chunk_tensor = np.repeat(np.arange(T, dtype=np.int64), nchunks)                              # (C,)
    first_chunk = np.concatenate(([0], np.cumsum(nchunks)[:-1])).astype(np.int64)                 # (T,)
    chunk_start = (np.arange(C, dtype=np.int64) - np.repeat(first_chunk, nchunks)) * CHUNK        # (C,)
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    eps, weight_decay = float(eps), float(weight_decay)
    f64 = np.array([beta1, 1.0 - beta1, beta2, 1.0 - beta2], dtype=np.float64).view(np.int64)
    host = np.concatenate((ptrs.reshape(-1), numels, chunk_tensor, chunk_start, f64))
    table = torch.from_numpy(host)
    if dev.type != "cpu":
        table = table.pin_memory().to(dev, non_blocking=True)

    # host scalars in float64, handed to the kernel as fp32
    decay = 1.0 - lr * weight_decay
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    step_size = lr / bc1
    bc2_sqrt = bc2 ** 0.5

    _adamw_multi[(C,)](
        table, T, C,
        decay, step_size, bc2_sqrt, eps,
        CHUNK=CHUNK, BLOCK=BLOCK, num_warps=num_warps,
    )
    for dst, src in writeback:
        with torch.no_grad():
            dst.copy_(src)
    return None
