#!/usr/bin/env bash
# The next GPU call (docs/benchmarks.md, "Open"): one command on a lent H100 or H200, for the AdamW
# step's host side: one optimizer step with the shipped entry (triton_mt_table-5083c73e, whose template
# checked every tensor on every call), the AdamW search over the template as it is now (lists whose metadata
# passed before are checked in one C++ call), starting at the shipped winner's knobs and two neighbours,
# three optimizer-step processes with the search's winner served (the host's speed varies between
# processes; the template now has run_unchecked, which kerneltune.optim calls on the steps it has checked), the
# two optimizers' host sides side by side with their kernels a no-op (optim_host.py, about 20 s: the figure
# measured on the CPU, 1.30x torch's, on this host), the 124M compare with it, kerneltune.attention's backward without a backward kernel (SDPA's own
# against the exact fp32 one, about 10 s), and the tests marked gpu (8 pytest processes at once, 100 s at most;
# one at a time they needed about 540 s). About 8½ minutes: give the device call timeout_s 560. Run it after
# next_attn.sh (the warp-specialised attention kernels, about 5 minutes), on the machine that leaves warm; with
# less than 560 s of device time left, without the tests: PHASES="optim host adamw optim optim optim train"
# (about 6½ minutes, timeout_s 420; docs/benchmarks.md, "the order"). Afterwards,
# here: promote the AdamW winner from the returned search.tgz (see all.sh) when its optimizer step beats the
# shipped entry's.
# The bench of every attention shape with variants (the previous next.sh) is PHASES="bench" with the
# BENCH_ARGS below (TOTAL=560 PHASES="bench"); the tests alone: PHASES="tests" T_TESTS=300.
# Run from the repository root: bash benchmarks/gpu/next.sh   (any variable below can be overridden)
ALSO="attention:TMA=1;attention_backward:TMA=1"
ALSO+=";adamw:CACHE=none;adamw:BLOCK=4096"
export TOTAL=${TOTAL:-510} PHASES=${PHASES:-optim host adamw optim optim optim train fallback tests} BENCH_S=${BENCH_S:-290}
export T_TESTS=${T_TESTS:-100}   # 120 before the host phase (about 20 s, 45 at most) came in
export T_ADAM=${T_ADAM:-180} TRAIN_IF_PROMOTED=${TRAIN_IF_PROMOTED-1} ADAM_ONLY=${ADAM_ONLY-triton_mt_table}
export ADAM_START=${ADAM_START-triton_mt_table:BLOCK=4096,num_warps=16;triton_mt_table:BLOCK=4096,num_warps=16,CACHE=none;triton_mt_table:BLOCK=4096,num_warps=8}
export BENCH_ARGS=${BENCH_ARGS:---compile-ops attention --also $ALSO}
exec bash "$(dirname "$0")/all.sh"
