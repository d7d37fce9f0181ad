"""Run a pytest selection as N pytest processes at once: the tests marked gpu in a fraction of the time.

The tests marked gpu spend most of their time in Triton's compiler (every knob set and head dim of every
kernel is a compilation of its own), on one core each; a lent GPU host has 16. This collects the selection
once, deals the test ids round-robin into ``--shards`` lists (a parametrized test's cases land on
different shards), runs one pytest process per list, all at once, each with the selection's options (every
argument that is not a path or test id: ``-m gpu``, ``-k ...``; without them the project's addopts, such as
``-m 'not slow'``, would deselect the ids dealt) and its own log, and waits for them up to ``--timeout``
seconds (then stops what is left: its tests count as not run). It prints one line per shard and a summary,
writes ``--json`` if asked, and exits 1 when a test failed or errored or a shard ran fewer tests than it was
dealt, 2 when a shard was stopped or none could be collected, else 0.

Correctness tests only: the shards share the device, so nothing they time is a measurement. Run it from
pytest's rootdir (the repository root): the test ids are relative to it.

Usage (repo root): python3 benchmarks/gpu/sharded_pytest.py [--shards 8] [--timeout 300] [--logs DIR]
                   [--json FILE] -- PYTEST_ARGS...
  e.g. python3 benchmarks/gpu/sharded_pytest.py --shards 8 --timeout 300 -- -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

_SUMMARY = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)")


# The collecting pytest, told to write down the arguments it took as paths or test ids (its positional
# file_or_dir): which of the others' words are an option's values (-m EXPR, -k EXPR, a plugin's options) only
# pytest's own parser knows.
_COLLECT = ("import json, sys, pytest\n"
            "class Paths:\n"
            "    def pytest_configure(self, config):\n"
            "        with open(sys.argv[1], 'w') as f:\n"
            "            json.dump(list(config.option.file_or_dir or []), f)\n"
            "sys.exit(pytest.main(sys.argv[2:], plugins=[Paths()]))\n")


def collect(pytest_args: list[str]) -> tuple[list[str], list[str]]:
    """The test ids the selection holds (pytest --collect-only -q), and the option arguments of pytest_args
    (every argument that is not a path or test id), which each shard gets too."""
    with tempfile.TemporaryDirectory() as tmp:
        where = os.path.join(tmp, "paths.json")
        out = subprocess.run([sys.executable, "-c", _COLLECT, where, "--collect-only", "-q", "-p",
                              "no:cacheprovider", *pytest_args], capture_output=True, text=True)
        ids = [line.strip() for line in out.stdout.splitlines() if "::" in line and not line.startswith(" ")]
        if out.returncode not in (0, 5) and not ids:  # 5: nothing collected
            tail = (out.stdout + out.stderr).strip().splitlines()[-1:] or ["?"]
            raise SystemExit(f"sharded_pytest: collecting failed (exit {out.returncode}): {tail[0]}")
        try:
            with open(where) as f:
                paths = list(json.load(f))
        except (OSError, ValueError):
            if ids:
                raise SystemExit("sharded_pytest: pytest did not say which arguments are paths") from None
            paths = []
    options: list[str] = []
    for a in reversed(pytest_args):  # the paths come last, as a rule: an option's value equal to one stays
        if a in paths:
            paths.remove(a)
        else:
            options.insert(0, a)
    return ids, options


def deal(ids: list[str], shards: int) -> list[list[str]]:
    """Round-robin: shard i takes ids i, i + n, i + 2n, ... (none empty)."""
    return [lst for lst in (ids[i::shards] for i in range(max(1, shards))) if lst]


def counts(log: str) -> dict[str, int]:
    """The figures of pytest's last summary line in ``log`` (passed, failed, error, skipped, ...)."""
    found: dict[str, int] = {}
    for line in reversed(log.splitlines()):
        if " in " in line and _SUMMARY.search(line):
            for n, what in _SUMMARY.findall(line):
                found["error" if what.startswith("error") else what] = int(n)
            break
    return found


def run(pytest_args: list[str], shards: int, timeout: float, logs: str, extra: list[str]) -> dict:
    ids, options = collect(pytest_args)
    if not ids:
        return {"collected": 0, "shards": [], "stopped": 0, "failed": 0}
    os.makedirs(logs, exist_ok=True)
    t0 = time.monotonic()
    procs = []
    for i, part in enumerate(deal(ids, shards)):
        path = os.path.join(logs, f"shard{i}.log")
        fh = open(path, "w")
        p = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *extra, *options, *part],
                             stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((i, part, p, fh, path))
    rows, stopped = [], 0
    for i, part, p, fh, path in procs:
        left = timeout - (time.monotonic() - t0)
        try:
            rc = p.wait(timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            rc = p.wait()
            stopped += 1
            rc = None
        fh.close()
        with open(path) as f:
            c = counts(f.read())
        ran = sum(c.get(k, 0) for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"))
        rows.append({"shard": i, "tests": len(part), "ran": ran, "rc": rc,
                     "seconds": round(time.monotonic() - t0, 1), "log": path, **c})
    # a shard pytest ended otherwise than with passing or failing tests (interrupted, internal or usage error:
    # a test id it could not find; 5: it ran none) or that ran fewer tests than it was dealt (deselected there)
    # counts as a failure too: a test that did not run did not pass
    failed = sum(r.get("failed", 0) + r.get("error", 0)
                 + (r["rc"] is not None and (r["rc"] not in (0, 1) or r["ran"] < r["tests"])) for r in rows)
    return {"collected": len(ids), "shards": rows, "stopped": stopped, "failed": failed,
            "seconds": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        own, pytest_args = argv[:cut], argv[cut + 1:]
    else:
        own, pytest_args = argv, []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for all shards together")
    ap.add_argument("--logs", default="sharded-logs", help="folder for one log per shard")
    ap.add_argument("--json", default="", metavar="FILE")
    ap.add_argument("--verbose", action="store_true", help="pytest -v --durations=0 in each shard")
    a = ap.parse_args(own)
    if a.shards < 1:
        print("sharded_pytest: --shards must be at least 1", file=sys.stderr)
        return 2
    extra = ["-v", "--durations=0"] if a.verbose else ["-q"]
    out = run(pytest_args, a.shards, a.timeout, a.logs, extra)
    for r in out["shards"]:
        figures = ", ".join(f"{r[k]} {k}" for k in ("passed", "failed", "error", "skipped") if r.get(k))
        state = "stopped at the timeout" if r["rc"] is None else f"exit {r['rc']}"
        short = f" (only {r['ran']} of them ran)" if r["rc"] is not None and r["ran"] < r["tests"] else ""
        print(f"shard {r['shard']}: {r['tests']} tests{short}, {figures or 'no summary'}, {state}, {r['seconds']} s "
              f"({r['log']})")
    total = {k: sum(r.get(k, 0) for r in out["shards"]) for k in ("passed", "failed", "error", "skipped")}
    print(f"sharded_pytest: {out['collected']} collected, {total['passed']} passed, {total['failed']} failed, "
          f"{total['error']} errors, {total['skipped']} skipped, {out['stopped']} shards stopped, "
          f"{out.get('seconds', 0)} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**out, "totals": total}, f, indent=1)
    if out["failed"]:
        return 1
    if out["stopped"] or not out["collected"]:
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
