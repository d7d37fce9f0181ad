"""Triton multi-tensor AdamW, one launch, aligned: per-tensor element offsets from four base pointers, cached table.

Changes against triton_multitensor.py:
- addressing: the table holds each tensor's element offset from the first tensor of its list (p, g, m, v), not
  a raw pointer; the bases are kernel pointer arguments, which Triton specialises as 16-byte aligned. When
  every tensor starts on a 16-byte boundary (any torch allocation does) the offsets are marked multiples of 4
  (tl.multiple_of), and each chunk's start (loaded from the table) a multiple of CHUNK, so the full blocks'
  loads and stores are 128-bit ones; otherwise ALIGNED=False drops the offsets' hint. (Without the start's
  hint every access was a 32-bit one: the PTX for sm90 from Triton 3.6, benchmarks/gpu/compile_check.py; the
  H100 runs before it measured that kernel.)
- the inner loop runs full BLOCKs without masks and one masked tail per chunk, so the mask never blocks
  vectorisation.
- the device table (offsets, numels, chunk map, the fp64 bits of b1, 1-b1, b2, 1-b2) is cached per
  (tensor addresses, sizes, b1, b2, CHUNK, CUDA stream); a new one (new gradient buffers, say) goes up from
  pinned memory without waiting for the device, queued on the stream that uses it. The cache holds addresses, never values: new values in the same buffers
  are read fresh on every call. The host's work per call is the contract's checks (one C++ call where the
  lists have the metadata of lists that passed before, else one C-level pass per list and property), the
  addresses of the 4 lists (one pass each), and the launch; run_unchecked (for a caller that has checked the
  lists itself: kerneltune.optim) leaves out the checks.
- MOMENTS knob: "f64" (moments updated in fp64 and rounded once, correctly rounded) or "f32" (fp32 FMAs, as
  torch's fused kernel; within the state tolerance).

Per element (decoupled weight decay, bias correction, 1-based step), as torch's AdamW:

    p <- p*(1 - lr*wd);  m <- b1*m + (1-b1)*g;  v <- b2*v + (1-b2)*g*g
    p <- p - (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)

Memory traffic: 28 B/element (read p, g, m, v; write p, m, v) + 40 B of table per chunk; bandwidth bound.
The parameter step is fp32 with IEEE sqrt and division (tl.sqrt_rn, tl.div_rn) in torch's order.
Works on CUDA and under the Triton CPU interpreter (TRITON_INTERPRET=1, CPU tensors).

Template knobs (KERNELTUNE["space"]): BLOCK (elements per vector step of a program), CHUNK (elements per
program), num_warps, MOMENTS, CACHE (the cache hints of the full blocks' accesses: "evict_first" loads;
"stream": evict_first loads and streaming (.cs) stores, every line touched once; "none": no hints). Restrictions: BLOCK <= CHUNK <= 64*BLOCK; 128*num_warps <= BLOCK <=
1024*num_warps (4 to 32 fp32 per thread and tensor: a 128-bit access at least, no spills).
"""
import itertools
import operator

import numpy as np
import torch
import triton
import triton.language as tl

KERNELTUNE = {
    "op": "adamw",
    "backend": "triton",
    "params": {"BLOCK": 2048, "CHUNK": 16384, "num_warps": 8, "MOMENTS": "f32", "CACHE": "evict_first"},
    "space": {
        "BLOCK": [512, 1024, 2048, 4096],
        "CHUNK": [8192, 16384, 32768, 65536, 131072],
        "num_warps": [2, 4, 8, 16],
        "MOMENTS": ["f32", "f64"],
        "CACHE": ["evict_first", "stream", "none"],
    },
    "restrictions": ["CHUNK >= BLOCK", "CHUNK <= 64 * BLOCK", "BLOCK >= 128 * num_warps", "BLOCK <= 1024 * num_warps"],
}


@triton.jit
def _adamw_step(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, b1, omb1, b2, omb2, decay, step_size, bc2_sqrt, eps,
                MASKED: tl.constexpr, F64: tl.constexpr, EVICT: tl.constexpr, STORE: tl.constexpr):
    if MASKED:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    else:
        p = tl.load(p_ptr + offs, eviction_policy=EVICT)
        g = tl.load(g_ptr + offs, eviction_policy=EVICT)
        m = tl.load(m_ptr + offs, eviction_policy=EVICT)
        v = tl.load(v_ptr + offs, eviction_policy=EVICT)
    if F64:  # moments in fp64, rounded once
        gd = g.to(tl.float64)
        m = (b1 * m.to(tl.float64) + omb1 * gd).to(tl.float32)
        v = (b2 * v.to(tl.float64) + omb2 * gd * gd).to(tl.float32)
    else:
        m = b1.to(tl.float32) * m + omb1.to(tl.float32) * g
        v = b2.to(tl.float32) * v + omb2.to(tl.float32) * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p * decay - tl.div_rn(step_size * m, denom)
    if MASKED:
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
    else:
        tl.store(p_ptr + offs, p, cache_modifier=STORE)
        tl.store(m_ptr + offs, m, cache_modifier=STORE)
        tl.store(v_ptr + offs, v, cache_modifier=STORE)


@triton.jit
def _adamw_aligned(
    P0, G0, M0, V0,             # fp32 base pointers: the first tensor of each list
    table,                      # int64: [offsets (T*4) | numel (T) | chunk_tensor (C) | chunk_start (C) | 4 fp64 bits]
    T, C,
    decay, step_size, bc2_sqrt, eps,            # fp32 scalars
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, F64: tl.constexpr,
    EVICT: tl.constexpr, STORE: tl.constexpr,   # cache hints of the full blocks (CACHE knob)
):
    c = tl.program_id(0)
    t = tl.load(table + T * 5 + c)                      # which tensor this chunk belongs to
    start = tl.multiple_of(tl.load(table + T * 5 + C + c), CHUNK)   # first element of the chunk (a multiple of CHUNK)
    n = tl.load(table + T * 4 + t)                      # numel of tensor t
    op = tl.load(table + t * 4 + 0)                     # element offsets from the bases
    og = tl.load(table + t * 4 + 1)
    om = tl.load(table + t * 4 + 2)
    ov = tl.load(table + t * 4 + 3)
    if ALIGNED:
        op = tl.multiple_of(op, 4)
        og = tl.multiple_of(og, 4)
        om = tl.multiple_of(om, 4)
        ov = tl.multiple_of(ov, 4)
    p_ptr = P0 + op
    g_ptr = G0 + og
    m_ptr = M0 + om
    v_ptr = V0 + ov
    sc = table + T * 5 + 2 * C
    b1 = tl.load(sc + 0).to(tl.float64, bitcast=True)
    omb1 = tl.load(sc + 1).to(tl.float64, bitcast=True)
    b2 = tl.load(sc + 2).to(tl.float64, bitcast=True)
    omb2 = tl.load(sc + 3).to(tl.float64, bitcast=True)
    offs0 = tl.arange(0, BLOCK)
    hi = tl.minimum(n - start, CHUNK)                   # the last chunk of a tensor stops at its end
    full = hi // BLOCK * BLOCK
    for i in range(0, full, BLOCK):                     # full blocks: no mask
        offs = start + i + offs0
        _adamw_step(p_ptr, g_ptr, m_ptr, v_ptr, offs, None, b1, omb1, b2, omb2, decay, step_size, bc2_sqrt, eps,
                    False, F64, EVICT, STORE)
    if full < hi:                                       # the tail: masked
        offs = start + full + offs0
        _adamw_step(p_ptr, g_ptr, m_ptr, v_ptr, offs, offs < n, b1, omb1, b2, omb2, decay, step_size, bc2_sqrt,
                    eps, True, F64, EVICT, STORE)


_CACHE_HINTS = {"evict_first": ("evict_first", ""), "stream": ("evict_first", ".cs"), "none": ("", "")}
_TABLES = {}  # (addresses, sizes, b1, b2, CHUNK, device, stream) -> (device table, T, C, aligned): addresses only
_DTYPE, _SHAPE = operator.attrgetter("dtype"), operator.attrgetter("shape")
_T = torch.Tensor


def _table(ptrs, numels, beta1, beta2, CHUNK, dev):
    """The device table for these buffers: built once per (addresses, sizes, b1, b2, CHUNK, device, stream).
    ptrs: the data pointers of params, then grads, then exp_avgs, then exp_avg_sqs (T each). A table is
    uploaded on, and used by, one stream only: its copy is queued on that stream, and the memory of one
    dropped from the cache is reused in that stream's order."""
    stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0
    key = (ptrs, numels, beta1, beta2, CHUNK, str(dev), stream)
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    T = len(numels)
    sizes = np.array(numels, dtype=np.int64)
    nchunks = (sizes + CHUNK - 1) // CHUNK
    C = int(nchunks.sum())
    ptr = np.array(ptrs, dtype=np.uint64).view(np.int64).reshape(4, T).T                         # (T, 4)
    byte_offs = ptr - ptr[0:1, :]                                                                 # from the bases
    aligned = bool((ptr % 16 == 0).all())
    offs = byte_offs // 4                                                                         # fp32 elements
    chunk_tensor = np.repeat(np.arange(T, dtype=np.int64), nchunks)                               # (C,)
    first_chunk = np.concatenate(([0], np.cumsum(nchunks)[:-1])).astype(np.int64)                  # (T,)
    chunk_start = (np.arange(C, dtype=np.int64) - np.repeat(first_chunk, nchunks)) * CHUNK         # (C,)
    f64 = np.array([beta1, 1.0 - beta1, beta2, 1.0 - beta2], dtype=np.float64).view(np.int64)
    table = torch.from_numpy(np.concatenate((offs.reshape(-1), sizes, chunk_tensor, chunk_start, f64)))
    if dev.type != "cpu":  # from pinned memory, queued: a new set of buffers never waits for the device
        table = table.pin_memory().to(dev, non_blocking=True)
    if len(_TABLES) > 16:
        _TABLES.clear()
    _TABLES[key] = hit = (table, T, C, aligned)
    return hit


try:  # torch's C++ tensor-metadata check (what torch.compile's guards run): one call for every tensor
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # a torch without it: the checks below on every call
    _TensorGuards = None
_GUARDS = {}  # (device, T, first and last shapes) -> a guard of the 4T tensors of the last lists that passed


def _checked(lists, dev):
    """Raise on what breaks the contract; True when every tensor is contiguous. The host side of a step over
    4 x 148 tensors is paid on every step: lists with the dtypes, device, shapes and strides of lists that
    passed before (the usual step: the same parameters and state, new gradients of the same shapes) pass in
    one C++ check of them all (about 0.06 us a tensor); others take one C-level pass per list and property
    (map, about 0.1 us a tensor and property), and are remembered when contiguous."""
    if _TensorGuards is None:
        return _checked_each(lists, dev)
    flat = [*lists[0], *lists[1], *lists[2], *lists[3]]
    key = (str(dev), len(lists[0]), _SHAPE(lists[0][0]), _SHAPE(lists[0][-1]))
    guard = _GUARDS.get(key)
    if guard is not None and guard.check(*flat):  # dtype, device, sizes, strides: those of checked tensors
        return True
    ok = _checked_each(lists, dev)
    if ok:
        try:  # sizes and strides given: checked exactly (None would leave a dimension unchecked)
            _GUARDS[key] = _TensorGuards(*flat, dynamic_dims_sizes=list(map(list, map(_SHAPE, flat))),
                                         dynamic_dims_strides=list(map(list, map(_T.stride, flat))))
        except Exception:  # noqa: BLE001 - another torch's signature: no shortcut, the checks every call
            _GUARDS.pop(key, None)
        if len(_GUARDS) > 16:
            _GUARDS.clear()
    return ok


def _checked_each(lists, dev):
    """The contract's checks, one C-level pass per list and property."""
    kind = operator.attrgetter("is_cuda" if dev.type == "cuda" else "is_cpu")
    index = dev.index if dev.type == "cuda" else -1
    shapes = list(map(_SHAPE, lists[0]))
    for j, lst in enumerate(lists):
        if (set(map(_DTYPE, lst)) != {torch.float32} or not all(map(kind, lst))
                or set(map(_T.get_device, lst)) != {index}):
            raise TypeError("all tensors must be float32 on one device")
        if j and list(map(_SHAPE, lst)) != shapes:
            raise ValueError("tensor i of every list must have one shape")
    return all(all(map(_T.is_contiguous, lst)) for lst in lists)


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    T = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == T):
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs must have equal length")
    if int(step) < 1:
        raise ValueError("step is 1-based")
    if T == 0:
        return None
    dev = params[0].device
    if dev.type not in ("cuda", "cpu"):
        raise TypeError(f"tensors on {dev.type} are not supported (cuda, or cpu under TRITON_INTERPRET=1)")
    if KERNELTUNE["params"].get("CACHE", "evict_first") not in _CACHE_HINTS:
        raise ValueError(f"CACHE must be one of {sorted(_CACHE_HINTS)}, not {KERNELTUNE['params'].get('CACHE')!r}")
    lists = [params, grads, exp_avgs, exp_avg_sqs]
    writeback = []
    if not _checked(lists, dev):  # contiguous is the contract; anything else goes through a copy, written back
        for j, lst in enumerate(lists):
            col = []
            for x in lst:
                y = x if x.is_contiguous() else x.detach().contiguous()
                if y is not x and j != 1:
                    writeback.append((x, y))
                col.append(y)
            lists[j] = col
    _launch(lists, dev, step, lr, beta1, beta2, eps, weight_decay)
    for dst, src in writeback:
        with torch.no_grad():
            dst.copy_(src)
    return None


def run_unchecked(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    """run() for a caller that has checked its preconditions itself (kerneltune.optim, on a step whose tensors
    have the metadata of tensors it checked before): lists of equal length, every tensor float32, contiguous,
    on one CUDA device (or the CPU under the interpreter), tensor i of every list of one shape. Nothing of that
    is checked again here (the checks of 4 x 148 tensors were a third of run()'s host time); the result is
    run()'s."""
    if int(step) < 1:
        raise ValueError("step is 1-based")
    if params:
        _launch([params, grads, exp_avgs, exp_avg_sqs], params[0].device, step, lr, beta1, beta2, eps,
                weight_decay)
    return None


def _launch(lists, dev, step, lr, beta1, beta2, eps, weight_decay):
    """The update of four checked lists of contiguous fp32 tensors: the addresses' table, then one launch."""
    pars = KERNELTUNE["params"]
    BLOCK, CHUNK, num_warps = int(pars["BLOCK"]), int(pars["CHUNK"]), int(pars["num_warps"])
    CHUNK = max(BLOCK, (CHUNK // BLOCK) * BLOCK)
    evict, store = _CACHE_HINTS[pars.get("CACHE", "evict_first")]
    numels = tuple(map(_T.numel, lists[0]))
    if sum(numels) == 0:
        return
    step = int(step)
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    eps, weight_decay = float(eps), float(weight_decay)
    ptrs = tuple(map(_T.data_ptr, itertools.chain(*lists)))
    table, T, C, aligned = _table(ptrs, numels, beta1, beta2, CHUNK, dev)

    decay = 1.0 - lr * weight_decay                     # host scalars in float64, handed over as fp32
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    _adamw_aligned[(C,)](
        lists[0][0], lists[1][0], lists[2][0], lists[3][0],
        table, T, C,
        decay, lr / bc1, bc2 ** 0.5, eps,
        CHUNK=CHUNK, BLOCK=BLOCK, ALIGNED=aligned, F64=pars["MOMENTS"] == "f64", EVICT=evict, STORE=store,
        num_warps=num_warps,
    )
