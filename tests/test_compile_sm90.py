"""The Triton templates compile for an H100 (sm90) on this GPU-less machine (benchmarks/gpu/compile_check.py):
through ptxas, without spilling in their loops, within the shared memory of a block, on Hopper's tensor-core MMA, and the AdamW
kernel's full blocks through 128-bit accesses (the hint that a chunk's start is a multiple of CHUNK)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_bench_templates_compile_for_sm90_without_spills_and_with_wide_accesses():
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # and one point outside the forward's space (a 128x128 score tile on 4 warps), which must spill
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu", "compile_check.py"), "--cases", "1",
                        "--also", "attention:BLOCK_N=128,num_warps=4,num_stages=2", "--json"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)["rows"]
    (spilling,) = [x for x in rows if x["point"]]
    fwd = spilling["kernels"]["_fa2_fwd"]
    assert fwd["spill_stores"] > 10 and fwd["flags"][0].startswith("spills"), fwd
    rows = [x for x in rows if not x["point"]]
    assert {x["op"] for x in rows} == {"attention", "attention_backward", "adamw"}
    kernels = {name: k for x in rows for name, k in x["kernels"].items()}
    assert set(kernels) == {"_fa2_fwd", "_bwd_delta", "_bwd_dkdv", "_bwd_dq", "_adamw_aligned"}
    for name, k in kernels.items():
        assert not [f for f in k["flags"] if not f.startswith("spills")] and k.get("local") == 0, (name, k)
        # spill stores in the SASS: none in the attention kernels; Triton 3.9 keeps one AdamW register on the
        # stack outside the loop (one STL, one LDL; Triton 3.6, the H100s', none)
        assert k["spill_stores"] <= (1 if name == "_adamw_aligned" else 0), (name, k)
    for name in ("_fa2_fwd", "_bwd_dkdv", "_bwd_dq"):
        assert kernels[name]["wgmma"] > 0, name
    ad = kernels["_adamw_aligned"]
    assert ad["global_128bit"] >= 7, ad     # 4 loads and 3 stores of the full blocks, at least


def test_a_kernel_that_does_not_compile_is_a_failed_point_and_exit_1(tmp_path):
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no NVIDIA backend")
    src = open(os.path.join(ROOT, "candidates", "adamw", "triton_mt_table.py")).read()
    broken = tmp_path / "broken.py"
    broken.write_text(src.replace("    full = hi // BLOCK * BLOCK\n", "    full = hi // BLOCK * BLOCK + undefined_name\n"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu", "compile_check.py"), "--ops", "adamw",
                        "--template", f"adamw={broken}"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ERROR" in r.stdout and "undefined_name" in r.stdout and "0 of 1 compiled" in r.stdout
