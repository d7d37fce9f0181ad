"""Which part of Landlock stops CUDA from starting on this machine? (diagnosis for a lent GPU)

Runs the confinement probe of kerneltune/evaluate/process.py with Landlock variants: each extra path made
writable, and the ABI capped below the network (4) and scope (6) features. Prints one line per variant.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from kerneltune.evaluate.process import _CUDA_PROBE, child_env

VARIANTS = [("as shipped", {}), ("abi<=3 (no net, no scope)", {"landlock_max_abi": 3}),
            ("abi<=5 (no scope)", {"landlock_max_abi": 5})]
VARIANTS += [(f"+ writable {p}", {"writable": [p]}) for p in ("/proc", "/sys", "/run", "/var", "/tmp", "/root", "/usr")]
VARIANTS += [("+ writable /", {"writable": ["/"]})]



def probe(variant: tuple[str, dict]) -> str:
    label, extra = variant
    workdir = tempfile.mkdtemp(prefix="kt-ll-")
    cfg = {"workdir": workdir, "file_bytes": 64 << 20, "landlock": True, **extra}
    r = subprocess.run([sys.executable, "-c", _CUDA_PROBE, json.dumps(cfg)], capture_output=True, text=True,
                       timeout=120, cwd=workdir, env=child_env({"HOME": workdir, "TMPDIR": workdir}))
    shutil.rmtree(workdir, ignore_errors=True)
    ok = r.returncode == 0 and "probe-ok" in r.stdout
    tail = (r.stderr or r.stdout).strip().splitlines()
    return f"landlock {label:32s} {'CUDA OK' if ok else 'CUDA FAILS: ' + (tail[-1][:120] if tail else '')}"


with ThreadPoolExecutor(len(VARIANTS)) as pool:  # all at once: a few seconds in all
    for line in pool.map(probe, VARIANTS):
        print(line, flush=True)
