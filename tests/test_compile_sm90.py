"""The Triton templates compile for an H100 (sm90) on this GPU-less machine (benchmarks/gpu/compile_check.py):
through ptxas, without spilling in their loops, within the shared memory of a block, on Hopper's tensor-core MMA, and the AdamW
kernel's full blocks through 128-bit accesses (the hint that a chunk's start is a multiple of CHUNK)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_env() -> dict[str, str]:
    """The environment of a compile_check run (no interpreter); skips where Triton has no NVIDIA backend."""
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no NVIDIA backend")
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_the_bench_templates_compile_for_sm90_without_spills_and_with_wide_accesses():
    env = _compile_env()
    # and one point outside the forward's space (a 128x128 score tile on 4 warps), which must spill, and the
    # warp-specialised forward at the same tile: Triton's Hopper pass takes its loop (12 warps: a producer warp
    # group and two consumers of 64 rows, each with its register budget) and nothing spills
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu", "compile_check.py"), "--cases", "1",
                        "--also", "attention:BLOCK_N=128,num_warps=4,num_stages=2;"
                                  "attention:TMA=2,BLOCK_N=128,num_warps=4,num_stages=2", "--json"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)["rows"]
    (spilling,) = [x for x in rows if x["point"] and "TMA" not in x["point"]]
    fwd = spilling["kernels"]["_fa2_fwd"]
    assert fwd["spill_stores"] > 10 and fwd["flags"][0].startswith("spills"), fwd
    (ws,) = [x["kernels"]["_fa2_fwd_ws"] for x in rows if x["point"].get("TMA") == 2]
    assert ws["setmaxnreg"] > 0 and ws["num_warps"] == 12 and ws["spill_stores"] == 0 and not ws["flags"], ws
    assert ws["wgmma"] > 0 and ws["tma"] > 0, ws
    assert ws["ws_regs"].startswith("down to "), ws   # the warp groups' budgets, read from the SASS
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


def test_the_warp_specialised_kernels_compile_for_sm90_with_this_triton_at_even_and_ragged_n():
    """The TMA = 2 kernels of both templates through this Triton's Hopper pass (CI's version; the H100s' 3.6 is
    in compile-sm90-triton3.6.txt), causal and full, at N = 1024 and at a ragged N (the full forward's and
    dQ's masks of the keys past N), in bf16 and (ragged) fp16: each warp-specialised (12 warps, setmaxnreg),
    no spills."""
    env = _compile_env()
    also = ("attention:TMA=2,num_warps=4,num_stages=2;attention_backward:TMA=2,num_warps=4,BLOCK_M1=32,"
            "BLOCK_N1=128,BLOCK_M2=128,BLOCK_N2=64,num_stages=2")
    for n, dtype in ((1024, "bf16"), (1000, "bf16"), (1000, "fp16")):   # fp16: the value cases' (GPU_VALUE_CASES)
        r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu", "compile_check.py"), "--ops",
                            "attention,attention_backward", "--cases", "2", "--n", str(n), "--dtype", dtype,
                            "--also", also, "--json"], capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        rows = [x for x in json.loads(r.stdout)["rows"] if x["point"].get("TMA") == 2]
        assert {x["case"] for x in rows} == {f"D128 {m} {dtype}" + ("" if n == 1024 else f" N{n}")
                                            for m in ("causal", "full")}
        ws = {(x["case"], name): k for x in rows for name, k in x["kernels"].items() if name.endswith("_ws")}
        assert {name for _, name in ws} == {"_fa2_fwd_ws", "_bwd_dkdv_ws", "_bwd_dq_ws"} and len(ws) == 6
        for key, k in ws.items():
            assert k["num_warps"] == 12 and k["setmaxnreg"] > 0 and k["spill_stores"] == 0, (n, key, k)


def test_a_kernel_that_does_not_compile_is_a_failed_point_and_exit_1(tmp_path):
    src = open(os.path.join(ROOT, "candidates", "adamw", "triton_mt_table.py")).read()
    broken = tmp_path / "broken.py"
    broken.write_text(src.replace("    full = hi // BLOCK * BLOCK\n", "    full = hi // BLOCK * BLOCK + undefined_name\n"))
    env = _compile_env()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu", "compile_check.py"), "--ops", "adamw",
                        "--template", f"adamw={broken}"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ERROR" in r.stdout and "undefined_name" in r.stdout and "0 of 1 compiled" in r.stdout


# the knobs a backward kernel does not read (the other kernel's blocks)
UNREAD = {"_bwd_dkdv": ("BLOCK_M2", "BLOCK_N2"), "_bwd_dq": ("BLOCK_M1", "BLOCK_N1"),
          "_bwd_dkdv_ws": ("BLOCK_M2", "BLOCK_N2"), "_bwd_dq_ws": ("BLOCK_M1", "BLOCK_N1")}


def test_no_point_of_the_attention_search_spaces_spilled_in_the_recorded_sweep():
    """benchmarks/results/compile-sm90-triton3.6-sweep.csv (every block, warp, stage, TMA and PIPE value, D = 128,
    Triton 3.6; the warp-specialised kernels at D = 64 and 128): each point that spilled registers or overflowed
    shared memory is outside its template's space, and the defaults did not spill."""
    import csv

    from kerneltune.search.space import load_template

    with open(os.path.join(ROOT, "benchmarks", "results", "compile-sm90-triton3.6-sweep.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    templates = {"attention": load_template(os.path.join(ROOT, "candidates", "attention", "triton_fa2.py")),
                 "attention_backward": load_template(os.path.join(ROOT, "candidates", "attention_backward",
                                                                  "triton_fa2_bwd.py"))}
    bad: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["status"] != "ok" or int(r["spill_stores"] or 0) > 0 or int(r["shared"]) > 227 * 1024:
            bad.setdefault((r["op"], r["point"]), []).append(r["kernel"])
    assert len(bad) > 50 and {op for op, _ in bad} == set(templates)   # the sweep found spilling points of both
    for (op, point), kernels in bad.items():
        t = templates[op]
        assert point != "defaults", (op, kernels)
        params = {**t.defaults}
        for kv in point.split(","):
            k, _, v = kv.partition("=")
            params[k] = int(v) if v.lstrip("-").isdigit() else v
        # a knob that no spilling kernel reads may take any value: the kernel compiles the same
        free = set.intersection(*(set(UNREAD.get(name, ())) for name in kernels))
        for combo in itertools.product(*(t.space[k] for k in free)):
            p = {**params, **dict(zip(free, combo))}
            in_space = all(p[k] in vals for k, vals in t.space.items()) and t.valid(p)
            assert not in_space, f"{op} {p}: {kernels} spilled in the sweep, yet the point is in the search space"


@pytest.mark.parametrize("script,ops", [("next.sh", {"attention", "attention_backward", "adamw"}),
                                        ("next_attn.sh", {"attention", "attention_backward"})])
def test_the_next_gpu_calls_variants_are_knobs_of_their_templates_and_compiled_in_the_record(script, ops):
    """benchmarks/gpu/next.sh and next_attn.sh (the prepared GPU calls): every --also variant names knobs and values
    of its template's search space and keeps its restrictions (bench_gpu stops at an unknown knob: a wasted call),
    and the recorded sm90 compile (compile-sm90-triton3.6.txt) compiled it at every specialisation without
    spills, warp-specialised where it asks for the TMA = 2 kernels."""
    import re
    import shlex

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_gpu import parse_also

    from kerneltune.search.space import load_template

    text = open(os.path.join(ROOT, "benchmarks", "gpu", script)).read()
    also = "".join(shlex.split(v)[0] for v in re.findall(r"^ALSO\+?=(.+)$", text, re.M))
    points = parse_also(also)
    assert set(points) == ops and all(points.values())  # parsed, not empty
    record = open(os.path.join(ROOT, "benchmarks", "results", "compile-sm90-triton3.6.txt")).read().splitlines()
    paths = {"attention": "attention/triton_fa2.py", "attention_backward": "attention_backward/triton_fa2_bwd.py",
             "adamw": "adamw/triton_mt_table.py"}
    for op, pts in points.items():
        t = load_template(os.path.join(ROOT, "candidates", paths[op]))
        for p in pts:
            assert all(k in t.space and v in t.space[k] for k, v in p.items()), (op, p, t.space)
            assert t.valid({**t.defaults, **p}), (op, p)
            lines = [ln for ln in record if ln.startswith(op + " ") and f" {json.dumps(p)} " in ln]
            # a line per kernel and specialisation: the forward's 4 (D 64/128, causal/full), the backward's 4 x 2-3
            assert len(lines) >= {"attention": 4, "attention_backward": 8, "adamw": 1}[op], (op, p)
            assert not [ln for ln in lines if "ERROR" in ln or "spills" in ln], (op, p)
            if p.get("TMA") == 2:
                assert all("warp-specialised" in ln for ln in lines if "_ws " in ln), (op, p)
                assert len([ln for ln in lines if "_ws " in ln]) >= {"attention": 4, "attention_backward": 8}[op]


def test_the_next_gpu_calls_adamw_start_points_are_points_of_the_template():
    """next.sh's ADAM_START: each point parses in triton_mt_table's space and keeps its restrictions (a bad point
    stops the search before its first run: a wasted call)."""
    import re

    from kerneltune.search.space import Space, load_template

    script = open(os.path.join(ROOT, "benchmarks", "gpu", "next.sh")).read()
    m = re.search(r"ADAM_START=\$\{ADAM_START-([^}]+)\}", script)
    assert m, "next.sh sets no ADAM_START"
    space = Space([load_template(os.path.join(ROOT, "candidates", "adamw", "triton_mt_table.py"))])
    points = space.parse_points(m.group(1))
    assert len(points) == len(m.group(1).split(";")) >= 1
