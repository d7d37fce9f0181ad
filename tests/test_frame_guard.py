"""The worker's audit hook (kerneltune/evaluate/worker.py, _guard_frames), installed in a fresh interpreter (a
hook cannot be removed): the candidate's own frame walks are refused, through inspect or traceback too, while
torch's own walks (torch.compile's, with the candidate's code further up the stack) go on."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

HARNESS = textwrap.dedent("""
    import importlib.util, sys
    import torch
    from kerneltune.evaluate.worker import _guard_frames
    found = []
    path = sys.argv[1]
    _guard_frames(path, found)
    spec = importlib.util.spec_from_file_location("cand", path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    SECRET = "the timing loop's locals"
    try:
        print("returned", m.run(torch.ones(3)))
    except Exception as e:
        print("raised", type(e).__name__)
    print("found", found)
""")

CANDIDATES = {
    "walk_tb": ("""
        import traceback
        def run(x):
            try:
                raise ValueError
            except ValueError as e:
                fr = next(traceback.walk_tb(e.__traceback__))[0]
            return getattr(getattr(fr, "f_" + "back"), "f_" + "locals").get("SECRET")
        """, "refused"),
    "walk_stack": ("""
        import traceback
        def run(x):
            return [getattr(f, "f_" + "locals").get("SECRET") for f, _ in traceback.walk_stack(None)]
        """, "refused"),
    "current_frames": ("""
        import sys, threading
        def run(x):
            return getattr(sys, "_current_" + "frames")()[threading.get_ident()]
        """, "refused"),
    "torch_compile": ("""
        import torch
        def _f(x):
            return x * 2 + 1
        _c = torch.compile(_f, backend="eager")
        def run(x):
            return _c(x)
        """, "allowed"),
}


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_the_candidates_frame_walks_are_refused_and_torchs_own_go_on(tmp_path, name):
    source, want = CANDIDATES[name]
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    r = subprocess.run([sys.executable, "-c", HARNESS, str(path)], capture_output=True, text=True, timeout=300)
    out = r.stdout
    if want == "refused":
        assert "raised RuntimeError" in out and "found []" not in out and "timing loop" not in out, out + r.stderr
    else:
        assert "returned tensor([3., 3., 3.])" in out and "found []" in out, out + r.stderr
