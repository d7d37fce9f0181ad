#!/usr/bin/env bash
# The first GPU call of the next session (docs/benchmarks.md, "Open"; next.sh after it): the warp-specialised
# attention kernels (TMA = 2 of triton_fa2 and triton_fa2_bwd: one loop each that Triton's Hopper pass splits
# into a producer warp group and two consumer warp groups) timed at every shape of the issue, forward and
# backward, beside the candidates' defaults, TMA = 1 and every baseline, the ceilings measured in the same run
# (bench_gpu.py; no torch.compile here: its compiles take the time). About 5 minutes: device timeout_s 330.
# Each contestant is probed first in a child process (bench_gpu.py: a hang or a fault costs its own row), and
# the rows so far come back as bench-partial.csv if the device's limit ends the call.
# Every variant below compiles for sm90 with Triton 3.6 without spills and warp-specialised
# (compile-sm90-triton3.6.txt; tests/test_compile_sm90.py holds this script to that record).
# Afterwards: a variant that beats the defaults is the start of a per-bucket search (all.sh's attn phase,
# ATTN_START="triton_fa2:TMA=2,num_warps=4,..." and ATTN_SHAPES).
# Run from the repository root: bash benchmarks/gpu/next_attn.sh   (any variable below can be overridden)
ALSO="attention:TMA=2,num_warps=4,num_stages=2;attention:TMA=2,num_warps=4,BLOCK_N=128,num_stages=2"
ALSO+=";attention:TMA=2,num_warps=4,num_stages=3;attention:TMA=1"
ALSO+=";attention:BLOCK_M=64,num_warps=4,num_stages=2"   # short sequences: two CTAs an SM, half the causal waste
ALSO+=";attention_backward:TMA=2,num_warps=4,BLOCK_M1=32,BLOCK_N1=128,BLOCK_M2=128,BLOCK_N2=64,num_stages=2"
ALSO+=";attention_backward:TMA=2,num_warps=4,BLOCK_M1=32,BLOCK_N1=128,BLOCK_M2=128,BLOCK_N2=64,num_stages=3"
ALSO+=";attention_backward:TMA=1"
export TOTAL=${TOTAL:-320} PHASES=${PHASES:-bench} BENCH_S=${BENCH_S:-260} T_ATTN=${T_ATTN:-0}
export BENCH_ARGS=${BENCH_ARGS:---ops attention,attention_backward --compile-ops none --also $ALSO}
exec bash "$(dirname "$0")/all.sh"
