"""`pip install .` (not editable) gives a working library: the shipped registry and every candidate it names."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

from tests.library.conftest import ROOT


@pytest.mark.slow
def test_the_wheel_ships_the_registry_and_its_candidates(tmp_path):
    wheels, target, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "src"
    # build from a copy: an in-tree build would leave build/ and egg-info in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                             ".pytest_cache", ".ruff_cache", "benchmarks"))
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True,
                   cwd=tmp_path)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), *glob.glob(str(wheels / "*.whl"))],
                   check=True, cwd=tmp_path)
    code = ("import kerneltune, kerneltune.registry as r, kerneltune.cli as c, torch\n"
            "reg = r.load()\n"
            "assert kerneltune.__file__.startswith(%r), kerneltune.__file__\n"
            "assert [s.error for s in reg.sources] == [''] and reg.sources[0].root == c.candidates_dir()\n"
            "assert all(r.check_file(e) == '' for e in reg.entries), [r.check_file(e) for e in reg.entries]\n"
            "assert os.path.isfile(os.path.join(c.candidates_dir(), 'attention', 'numba_cpu.py'))\n"
            "q = torch.randn(1, 2, 3, 8)\n"
            "kerneltune.attention(q, q, q)\n"
            "print(len(reg.entries), kerneltune.served())\n") % str(target)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNELTUNE_REGISTRY")}
    r = subprocess.run([sys.executable, "-c", "import os\n" + code], cwd=tmp_path, capture_output=True, text=True,
                       env={**env, "PYTHONPATH": str(target)})
    assert r.returncode == 0, r.stderr
    assert "{'attention': {'reference': 1}}" in r.stdout


def test_the_documented_submodules_are_there_after_a_plain_import():
    """docs/library.md names kerneltune.library.reload() and kerneltune.registry.KernelTuneWarning: a fresh
    `import kerneltune` reaches them (imported on first use; kerneltune.registry without torch)."""
    code = ("import sys, kerneltune\n"
            "assert 'torch' not in sys.modules\n"
            "assert issubclass(kerneltune.registry.KernelTuneWarning, Warning)\n"
            "assert 'torch' not in sys.modules\n"
            "kerneltune.library.reload()\n"
            "assert kerneltune.optim.AdamW and kerneltune.library.serve.reload is kerneltune.library.reload\n"
            "try:\n"
            "    kerneltune.no_such_module\n"
            "except AttributeError as ex:\n"
            "    assert 'no_such_module' in str(ex)\n"
            "else:\n"
            "    raise AssertionError('no AttributeError')\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNELTUNE")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
