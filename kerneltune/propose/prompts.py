"""What kerneltune tells Claude: the prompt of a proposal request and of a repair request, and the parser
of the answer.

A request is ``system`` (two blocks, both marked for prompt caching: they are identical for every request
of a run) plus one user message (what changes: the baseline, the best candidates so far, recent
failures, or the failing file to repair):

    system[0]  role, rules, the op contract, forbidden calls, the candidate file format, the answer format
    system[1]  the device, its measured ceilings, example candidates (the shipped seeds timed on it)
    user       state of the search + the task (a new candidate, or a repair of one that failed)

Nothing here touches the network or the store; every function is pure (text in, text out), so a stored
response parses to the same source every time (``replay`` depends on it).
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from kerneltune.backends import BACKENDS, capability
from kerneltune.ops import get_op

EXAMPLE_CHARS = 12000          # one example file at most this long (longer ones are cut, said so)
EXAMPLES_TOTAL_CHARS = 30000   # all examples together
TOP_WITH_SOURCE = 2            # best candidates shown with their source
TOP_LISTED = 8                 # best candidates listed with timings
FAILURES_SHOWN = 6             # recent failures with their reason
SOURCE_CHARS = 14000           # a candidate source quoted in the user message


# -- the static part --------------------------------------------------------------------------------------

def op_contract(op: str) -> str:
    """The contract of ``op``: signature, summary, the docs/candidates.md section (or the module docstring)."""
    spec = get_op(op)
    section = _doc_section(op)
    if not section:
        import importlib

        section = (importlib.import_module(type(spec).__module__).__doc__ or "").strip()
    sig = "" if spec.signature in section else f"signature: `{spec.signature}`\n\n"
    return f"op `{op}`: {spec.summary}\n\n{sig}{section}".strip()


def _doc_section(op: str) -> str:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, "docs", "candidates.md")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return ""
    m = re.search(rf"^### {re.escape(op)}\s*$(.*?)(?=^##|\Z)", text, flags=re.M | re.S)
    return m.group(1).strip() if m else ""


def timed_backends(device: str) -> list[str]:
    return [b for b in BACKENDS if capability(b, device).timed]


def system_rules(op: str, device: str) -> str:
    spec = get_op(op)
    backends = timed_backends(device)
    forbidden = ", ".join(f"`{s}`" for s in spec.forbidden_source) or "(none)"
    return f"""You are a GPU/CPU kernel engineer working inside kerneltune, a search for faster kernels for LLM
pre-training. You write candidate kernels for one op; every candidate you write is checked against a
float64 reference on many shapes (odd sizes, N=1, odd head counts, explicit scales, both causal settings,
every dtype, several random seeds, again after timing with new values in the same buffers) and timed
against the op's primary baseline ({spec.primary_baseline}) in the same run. Only correct candidates are timed.
Fitness is the speedup over {spec.primary_baseline} at the timed shape.

## The op contract

{op_contract(op)}

## The candidate file

One self-contained Python file, importing nothing outside the standard library, torch, triton, numba
and numpy:

```python
\"\"\"One line: what this variant does differently.

Then the algorithm and the work it does.
\"\"\"
KERNELTUNE = {{"op": "{op}", "backend": "{backends[0] if backends else 'torch'}"}}   # a literal dict

def {spec.signature.split(' -> ')[0]}:
    ...
```

- `KERNELTUNE["op"]` must be "{op}"; `KERNELTUNE["backend"]` one of {", ".join(backends)} (the backends
  timed on this device; others are not timed here and can never win).
- It must be correct on every valid input of the op, not only on the timed shape.
- Forbidden anywhere in the file, comments and docstrings included (the file is rejected): {forbidden};
  also kerneltune's own modules, `gc`, `inspect`, `subprocess`, `socket`, `multiprocessing`, `pickle`,
  frame or trace introspection (`_getframe`, `f_back`, `settrace` …).
- No caching of results across calls, no work left running after `run` returns (threads, streams), no
  changing global numerics (tf32, matmul precision, thread counts), no lower precision than the contract
  allows: each of these is detected and the candidate rejected.

## Your answer

Think briefly about what limits the current best (memory traffic, parallelism, recomputation, launch
overhead), then give exactly ONE complete candidate file in a single ```python code block. The code block
is taken as the whole file: no ellipses, no placeholders, nothing outside it is used."""


def load_examples(op: str, device: str, candidate_dirs: list[str]) -> list[tuple[str, str]]:
    """(name, source) of the shipped candidates of ``op`` whose backend is timed on ``device``."""
    want = set(timed_backends(device))
    out: list[tuple[str, str]] = []
    total = 0
    for d in candidate_dirs:
        for path in sorted(glob.glob(os.path.join(d, "*.py"))):
            try:
                with open(path, encoding="utf-8") as f:
                    src = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            meta = _guess(src)
            if meta.get("op") != op or meta.get("backend") not in want:
                continue
            src = _cut(src, EXAMPLE_CHARS)
            if total + len(src) > EXAMPLES_TOTAL_CHARS:
                break
            total += len(src)
            out.append((os.path.splitext(os.path.basename(path))[0], src))
    return out


def system_context(device_info: dict[str, Any], ceilings: dict[str, Any] | None,
                   examples: list[tuple[str, str]]) -> str:
    dev = {k: v for k, v in device_info.items() if k != "key"}
    lines = ["## The device", "", "```json", json.dumps(dev, indent=1, default=str), "```", ""]
    if ceilings:
        lines += [f"Measured ceilings: copy bandwidth {ceilings.get('copy_gbps', 0):.1f} GB/s; matmul "
                  + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in (ceilings.get("matmul_tflops") or {}).items()), ""]
    else:
        lines += ["Ceilings not measured yet on this device.", ""]
    if device_info.get("kind") == "cpu":
        lines += ["On this CPU, torch and numba candidates are timed; Triton runs only in its interpreter (never "
                  "timed) and CUDA not at all.", ""]
    if examples:
        lines += ["## Example candidates (shipped seeds; they pass)", ""]
        for name, src in examples:
            lines += [f"### {name}.py", "", "```python", src.rstrip(), "```", ""]
    return "\n".join(lines).rstrip()


# -- the dynamic part -------------------------------------------------------------------------------------

@dataclass
class SearchState:
    """What the proposer has learned from the verdicts told to it."""

    baseline: dict[str, Any] | None = None          # {"name", "median_ms", "shape"}
    best: list[dict[str, Any]] = field(default_factory=list)      # passed, best speedup first
    failures: list[dict[str, Any]] = field(default_factory=list)  # recent failures, newest last
    tried: int = 0

    def add(self, result: dict[str, Any], source: str | None) -> None:
        self.tried += 1
        status = result.get("status")
        cases = result.get("cases") or []
        if cases and not self.baseline:
            b = result.get("baseline")
            base = (cases[0].get("baselines") or {}).get(b) if b else None
            if base:
                self.baseline = {"name": b, "median_ms": base.get("median_ms"), "shape": cases[0].get("name")}
        if status == "passed" and result.get("speedup") is not None:
            if any(e["hash"] == result.get("hash") for e in self.best):
                return
            roof = (cases[0].get("roofline") if cases else None) or {}
            self.best.append({"name": result.get("name"), "hash": result.get("hash"), "speedup": result["speedup"],
                              "median_ms": result.get("median_ms"), "p20_ms": result.get("p20_ms"),
                              "p80_ms": result.get("p80_ms"), "gbps": roof.get("gbps"), "tflops": roof.get("tflops"),
                              "pct_of_roof": roof.get("pct_of_roof"), "bound": roof.get("bound"),
                              "summary": _summary(source or ""), "source": source or ""})
            self.best.sort(key=lambda e: -e["speedup"])
            del self.best[TOP_LISTED:]
        elif status and status != "passed":
            self.failures.append({"name": result.get("name"), "status": status,
                                  "reason": str(result.get("reason") or "")[:600], "summary": _summary(source or "")})
            del self.failures[:-FAILURES_SHOWN]

    def add_malformed(self, reason: str) -> None:
        self.failures.append({"name": "(your answer)", "status": "malformed", "reason": reason, "summary": ""})
        del self.failures[:-FAILURES_SHOWN]


def _state_text(state: SearchState, shape: str | None) -> str:
    lines = []
    if state.baseline:
        lines.append(f"Baseline {state.baseline['name']} at {state.baseline['shape']}: median "
                     f"{state.baseline['median_ms']:.4f} ms.")
    elif shape:
        lines.append(f"The timed shape is {shape}; no candidate has been timed yet in this search.")
    if state.best:
        lines += ["", "Best candidates so far (speedup over the baseline, median, achieved rate, % of roof):"]
        for e in state.best:
            roof = f", {e['pct_of_roof']:.1f}% of roof ({e['bound']}-bound)" if e.get("pct_of_roof") is not None else ""
            rate = f", {e['gbps']:.1f} GB/s, {e['tflops']:.4f} TFLOP/s" if e.get("gbps") is not None else ""
            lines.append(f"- {e['name']}: {e['speedup']:.3f}x, {e['median_ms']:.4f} ms{rate}{roof} — {e['summary']}")
        for e in state.best[:TOP_WITH_SOURCE]:
            lines += ["", f"Source of {e['name']} ({e['speedup']:.3f}x):", "```python", _cut(e["source"], SOURCE_CHARS).rstrip(),
                      "```"]
    else:
        lines += ["", "No candidate of yours has passed yet: start from what the examples do well."]
    if state.failures:
        lines += ["", "Recent failures (do not repeat them):"]
        for f in state.failures:
            lines.append(f"- {f['name']}: {f['status']}: {f['reason']}" + (f" — {f['summary']}" if f["summary"] else ""))
    return "\n".join(lines)


def propose_message(state: SearchState, op: str, shape: str | None) -> str:
    return (_state_text(state, shape) + "\n\n"
            f"Write ONE new `{op}` candidate, different from those above, that you expect to beat the best so far "
            "while staying exactly correct. Answer with the complete file in one ```python block.")


def repair_message(source: str, status: str, reason: str, attempt: int, attempts: int, op: str) -> str:
    return (f"This `{op}` candidate (yours) failed the evaluator with verdict `{status}`:\n\n{reason}\n\n"
            f"```python\n{_cut(source, SOURCE_CHARS).rstrip()}\n```\n\n"
            f"Fix it (repair {attempt} of {attempts}). Keep its idea if it can be made correct; keep the op "
            f"\"{op}\". Answer with the complete corrected file in one ```python block.")


# -- parsing the answer -----------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)


@dataclass
class Parsed:
    source: str | None       # the candidate file, or None when the answer is malformed
    problem: str = ""        # why it is malformed ("" when source is set)


def parse_answer(text: str, op: str) -> Parsed:
    """The candidate file in Claude's answer: the ```python block. When there are several, the best tier
    wins: blocks with both ``KERNELTUNE`` and ``def run``, then those with ``KERNELTUNE``, then those with
    ``def run`` (so a "key change" snippet after the whole file is not taken for it); the last block of that
    tier; with none of them, the longest block. Malformed: no code block, or a KERNELTUNE for another op."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text or "")]
    bodies = [body for lang, body in blocks if lang in ("python", "py", "python3", "")]
    if not bodies:
        return Parsed(None, "no ```python code block in the answer")

    def tier(b: str) -> int:
        return 2 * ("KERNELTUNE" in b) + bool(re.search(r"^def run\b", b, re.M))

    best = max(tier(b) for b in bodies)
    body = [b for b in bodies if tier(b) == best][-1] if best else max(bodies, key=len)
    source = body.strip("\n") + "\n"
    other = _guess(source).get("op")
    if other is not None and other != op:
        return Parsed(None, f"the candidate is for op {other!r}, not {op!r}")
    return Parsed(source)


def _guess(source: str) -> dict[str, Any]:
    from kerneltune.evaluate.static import guess_meta

    return guess_meta(source)


def _summary(source: str) -> str:
    m = re.match(r'\s*(?:"""|\'\'\')\s*(.*?)\s*(?:\n|"""|\'\'\')', source)
    return m.group(1)[:200] if m else ""


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n# … ({len(text) - limit} more characters not shown)\n"
