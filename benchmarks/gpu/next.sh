#!/usr/bin/env bash
# The next GPU call (docs/benchmarks.md, "Open"): one command of about 9 minutes on a lent H100, in the order of
# what matters most: the bench (all 24 attention shapes forward and backward, AdamW at GPT-2 small) with each
# candidate's variants timed beside it, one optimizer step, the AdamW search (starting at the bench's best
# variant), the step again, the 124M compare if something was promoted.
# Every variant compiles for sm90 with the H100s' Triton 3.6 (benchmarks/results/compile-sm90-triton3.6.txt);
# tests/test_compile_sm90.py checks that each names knobs and values of its template's space.
# Run from the repository root: bash benchmarks/gpu/next.sh   (any variable below can be overridden)
# The variants are the knob values that came within a few percent of the defaults or beat them on the H100
# on 2026-11-27 (docs/benchmarks.md); those that lost everywhere (GROUP_BY_HEAD=0, PIPE, ATOMIC_DQ, 128-key
# dK/dV blocks, streaming stores, 128k chunks, 1024-element blocks) are left out.
ALSO="attention:TMA=1;attention_backward:TMA=1"
ALSO+=";adamw:CACHE=none;adamw:BLOCK=4096"
export TOTAL=${TOTAL:-560} PHASES=${PHASES:-bench optim adamw optim train} BENCH_S=${BENCH_S:-290}
export T_ADAM=${T_ADAM:-170} TRAIN_IF_PROMOTED=${TRAIN_IF_PROMOTED-1}
export ADAM_ONLY=${ADAM_ONLY-triton_mt_table triton_multitensor}
export BENCH_ARGS=${BENCH_ARGS:---compile-ops attention --also $ALSO}
exec bash "$(dirname "$0")/all.sh"
