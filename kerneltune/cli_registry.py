"""`kerneltune promote`, `kerneltune registry`, `kerneltune explain`: winners into the registry, and which
kernel a library call gets. Registered on the main app by ``register(app)`` (cli.py).

promote copies a candidate that passed (and was timed) on a device from the store into
``candidates/<op>/`` under the registry's candidates root, with a provenance header, and adds one
registry entry per shape it was timed at. It refuses a candidate that has not passed on that device.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import typer

from kerneltune import registry as reg

JsonOpt = typer.Option(False, "--json", help="print machine-readable JSON on stdout")
RegistryOpt = typer.Option(None, "--registry", help="registry JSON (default: $KERNELTUNE_REGISTRY, else the "
                                                   "registry shipped in the package)")
DbOpt = typer.Option(None, "--db", help="SQLite store (default: the user cache dir, or $KERNELTUNE_DB)")
_ARGS = {"attention": ("causal",), "attention_backward": ("causal",)}  # call arguments a registry entry keys on


class PromoteError(Exception):
    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.code = code


@dataclass
class Promoted:
    candidate: str
    file: str
    copied: bool
    registry: str
    added: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)   # existing, faster entries not replaced


def default_registry() -> str:
    return os.environ.get(reg.ENV_REGISTRY, "").strip() or reg.shipped_path()


def _this_machine_keys(device: Optional[str]) -> list[str]:
    kinds = [device] if device else ["cpu", "cuda"]
    keys = []
    for kind in kinds:
        if kind == "cuda":
            import torch

            if not torch.cuda.is_available():
                if device:
                    raise PromoteError("--device cuda: no CUDA GPU on this machine; use --device-key KEY to promote "
                                       "an evaluation recorded on another machine", 2)
                continue
        keys.append(reg.device_key(kind))
    return keys


def _resolve(store: Any, ref: str) -> Any:
    """A store row for a hash, hash prefix, name, or candidate file path."""
    from kerneltune.evaluate.static import StaticReject, inspect_source, read_candidate

    if os.path.isfile(ref):
        try:
            cand = read_candidate(ref)
            inspect_source(cand)
        except StaticReject as e:
            raise PromoteError(f"{ref}: {e.reason}") from None
        row = store.candidate(cand.hash)
        if row is None:
            raise PromoteError(f"{ref} has never been evaluated (not in {store.path}); run kerneltune eval {ref} "
                               "--device ... first")
        return row
    row = store.candidate(ref)
    if row is None:
        raise PromoteError(f"no candidate {ref!r} in {store.path}: give a candidate file, a hash prefix or a name "
                           "from kerneltune leaderboard", 2)
    return row


def promote(store: Any, ref: str, registry_path: str, *, device: Optional[str] = None,
            device_key: Optional[str] = None, force: bool = False) -> Promoted:
    """Copy a passed candidate into the registry's candidates folder and add its entries (see module doc)."""
    from kerneltune.evaluate.evaluator import missing_checks
    from kerneltune.ops import get_op

    row = _resolve(store, ref)
    keys = [device_key] if device_key else _this_machine_keys(device)
    evals = list(store.evaluations(candidate_hash=row["hash"]))
    passed = [e for e in evals if e["status"] == "passed" and e["device_key"] in keys]
    # a pass that a later verdict contradicts (wrong, caught cheating, crashed, timed out) is not what the file
    # does now: the leaderboard and the search's cache take the latest verdict too
    worse = [e for e in evals if e["status"] != "passed" and e["device_key"] in keys]
    if passed and worse and worse[-1]["id"] > passed[-1]["id"]:
        w = worse[-1]
        raise PromoteError(f"{row['name']} ({row['hash'][:12]}) passed, but its latest verdict on {w['device_key']} "
                           f"is {w['status']} ({w['reason'][:120]}); a kernel whose latest evaluation failed is not "
                           f"promoted: evaluate it again (kerneltune eval)")
    stale = {e["id"]: missing_checks(get_op(row["op"]), json.loads(e["result"]), reg.device_kind(e["device_key"]))
             for e in passed}
    if passed and all(stale.values()):
        names = stale[passed[-1]["id"]]
        raise PromoteError(f"{row['name']} ({row['hash'][:12]}) passed before the {row['op']} checks gained "
                           f"{len(names)} case(s) ({', '.join(names[:3])}{', …' if len(names) > 3 else ''}); "
                           f"evaluate it again: kerneltune eval --device {device or 'cpu|cuda'}")
    passed = [e for e in passed if not stale[e["id"]]]
    if not passed:
        here = [f"{e['status']} ({e['reason'][:80]})" for e in evals if e["device_key"] in keys]
        elsewhere = sorted({e["device_key"] for e in evals if e["status"] == "passed"} - set(keys))
        msg = f"{row['name']} ({row['hash'][:12]}) has not passed on {' or '.join(keys) or 'this device'}"
        if here:
            msg += f": its verdicts there: {'; '.join(here[-3:])}"
        if elsewhere:
            msg += f"; it passed on {', '.join(elsewhere)} (promote with --device-key KEY)"
        else:
            msg += f"; evaluate it with kerneltune eval --device {device or 'cpu|cuda'}"
        raise PromoteError(msg)
    cases: dict[tuple[str, str], tuple[Any, dict[str, Any], dict[str, Any]]] = {}
    noisy = 0
    for e in passed:  # the latest timing of each (device, shape) wins; one timed on a busy machine never does
        result = json.loads(e["result"])
        for case in result.get("cases") or []:
            if case.get("speedup") is None:
                continue
            if case.get("noisy"):
                noisy += 1
            else:
                cases[(e["device_key"], case["name"])] = (e, result, case)
    if not cases and noisy:
        raise PromoteError(f"{row['name']} was timed only on a machine too busy to trust the ratio (noisy timing); "
                           f"evaluate it again on a quieter machine: kerneltune eval --device {device or 'cpu|cuda'}")
    if not cases:
        raise PromoteError(f"{row['name']} passed on {', '.join(sorted({e['device_key'] for e in passed}))} but was "
                           "never timed there (e.g. Triton under the CPU interpreter): no speedup to promote")
    registry_path = os.path.abspath(registry_path)
    r = reg.load(registry_path)
    if any(s.error for s in r.sources):
        raise PromoteError(next(s.error for s in r.sources if s.error))
    root = r.sources[0].root
    path, copied = _place(row, root)
    out = Promoted(row["name"], path, copied, registry_path)
    for (_key, _name), (e, result, case) in sorted(cases.items()):
        entry = _entry(row, e, result, case, path, root)
        old = next((x for x in r.entries if x.key() == entry.key()), None)
        if old is not None and old.speedup > entry.speedup and old.source_hash != entry.source_hash and not force:
            out.kept.append({"bucket": entry.bucket, "dtype": entry.dtype, "args": entry.args, "kept": old.name,
                             "kept_speedup": old.speedup, "new_speedup": entry.speedup})
            continue
        replaced = r.add(entry)
        out.added.append({"op": entry.op, "device_key": entry.device_key, "bucket": entry.bucket, "dtype": entry.dtype,
                          "args": entry.args, "speedup": entry.speedup, "baseline": entry.baseline,
                          "replaced": replaced.name if replaced else None})
    if copied and not out.added:
        os.remove(path)  # nothing points at it
        out.copied, out.file = False, ""
    r.save(registry_path)
    return out


def _place(row: Any, root: str) -> tuple[str, bool]:
    """The file under root/<op>/ holding this source: an existing one with the same source, else a new copy."""
    want = row["hash"]
    folder = os.path.join(root, row["op"])
    for p in sorted(glob.glob(os.path.join(folder, "*.py"))):
        try:
            with open(p, encoding="utf-8") as f:
                if reg.file_hash(reg.strip_header(f.read())) == want:
                    return p, False
        except (OSError, UnicodeDecodeError):
            continue
    source = reg.strip_header(row["source"])
    path = os.path.join(folder, f"{row['name']}.py")
    if os.path.exists(path):
        path = os.path.join(folder, f"{row['name']}-{want[:8]}.py")
    header = [f"{row['name']}: {row['op']} kernel ({row['backend']}), promoted by kerneltune promote on "
              f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
              f"candidate hash {want} (origin {row['origin'] or '?'}, parent {row['parent'] or '-'})",
              "Where it passed and how fast it was: the registry entries that name this file.",
              "These lines are not part of the evaluated source; what follows them must hash to the candidate hash."]
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(reg.with_header(source, header))
    except OSError as e:
        raise PromoteError(f"{path}: cannot write the candidate copy ({e.strerror}); pass a writable --registry") from None
    return path, True


def _entry(row: Any, ev: Any, result: dict[str, Any], case: dict[str, Any], path: str, root: str) -> reg.Entry:
    prov = result.get("provenance") or {}
    c = case["case"]
    op = row["op"]
    dims = reg.norm_dims(op, c["dims"])
    args = {k: c.get("args", {})[k] for k in _ARGS.get(op, ()) if k in c.get("args", {})}
    source_hash = row["hash"] if not row["source"].startswith(reg.HEADER_START) else \
        reg.file_hash(reg.strip_header(row["source"]))
    return reg.Entry(
        op=op, device_key=ev["device_key"], device_name=ev["device_name"], dtype=c["dtype"], dims=dims, args=args,
        bucket=reg.bucket(op, dims), candidate=os.path.relpath(path, root), source_hash=source_hash,
        params=json.loads(row["params"] or "{}"), baseline=result.get("baseline") or "", speedup=float(case["speedup"]),
        p20_ms=case.get("p20_ms"), median_ms=case.get("median_ms"), p80_ms=case.get("p80_ms"),
        versions=prov.get("versions") or {}, timestamp=prov.get("timestamp") or "",
        provenance={"evaluation": ev["id"], "run": ev["run_id"], "case": case["name"], "candidate_hash": row["hash"],
                    "origin": row["origin"], "parent": row["parent"], "threads": prov.get("threads"),
                    "clock": (prov.get("timing") or {}).get("clock"),
                    "baselines_ms": {n: b.get("median_ms") for n, b in (case.get("baselines") or {}).items()},
                    "promoted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        name=row["name"], backend=row["backend"], root=root)


# -- reporting -------------------------------------------------------------------------------------------------
def entry_status(e: reg.Entry, here: set[str], minimum: float) -> str:
    """serves | other device | below minimum | <file problem> (every entry's file is checked, another device's
    too: a CI machine without that GPU is where a deleted or edited shipped kernel must be caught)."""
    why = reg.check_file(e)
    if why:
        return "file missing" if "missing" in why else "file changed" if "changed" in why else "file unreadable"
    if e.device_key not in here:
        return "other device"
    return "serves" if e.speedup >= minimum else "below minimum"


def _show_path(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _here_keys() -> set[str]:
    import torch

    keys = {reg.device_key("cpu")}
    if torch.cuda.is_available():
        keys.add(reg.device_key("cuda"))
    return keys


def register(app: typer.Typer) -> None:
    from kerneltune.cli import _open_store, err, out, usage_error

    @app.command("promote")
    def promote_cmd(
        candidate: str = typer.Argument(..., help="candidate file, hash prefix or name (as in the leaderboard)"),
        registry: Optional[str] = RegistryOpt,
        device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda: where it must have passed "
                                                                    "(default: any device of this machine)"),
        device_key: Optional[str] = typer.Option(None, "--device-key", help="promote the evaluation recorded for "
                                                                            "this device key (another machine's)"),
        force: bool = typer.Option(False, "--force", help="replace an existing entry even when it is faster"),
        json_out: bool = JsonOpt,
        db: Optional[str] = DbOpt,
    ) -> None:
        """Put a candidate that passed on this device into the registry (one entry per timed shape)."""
        if device is not None and device not in ("cpu", "cuda"):
            usage_error(f"--device {device!r}: use cpu or cuda")
        if device_key is not None and device_key.count(":") < 2:
            usage_error(f"--device-key {device_key!r}: a key looks like cpu:<model>:<threads>t or "
                        "cuda:<gpu-name>:sm<cc> (see kerneltune registry or leaderboard --json)")
        target = registry or default_registry()
        store = _open_store(db)
        try:
            res = promote(store, candidate, target, device=device, device_key=device_key, force=force)
        except (PromoteError, reg.RegistryError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(getattr(e, "code", 1)) from None
        finally:
            store.close()
        if json_out:
            print(json.dumps(res.__dict__, indent=1))
        else:
            where = ("copied to " if res.copied else "already at ") + _show_path(res.file) if res.file else ""
            out.print(f"promoted [green]{res.candidate}[/] into {res.registry}" + (f"; {where}" if where else ""),
                      highlight=False)
            for a in res.added:
                what = " ".join(x for x in (a["op"], a["bucket"], a["dtype"], reg._args_text(a["args"])) if x)
                out.print(f"  {what} on {a['device_key']}: "
                          f"{a['speedup']:.3f}× vs {a['baseline']}" + (f" (replaces {a['replaced']})" if a["replaced"]
                                                                       else ""), highlight=False)
            for k in res.kept:
                err.print(f"  kept {k['kept']} at {k['bucket']} {k['dtype']}: {k['kept_speedup']:.3f}× beats "
                          f"{k['new_speedup']:.3f}× (--force replaces it)", highlight=False)
        raise typer.Exit(0 if res.added else 1)

    @app.command("registry")
    def registry_cmd(
        registry: Optional[str] = typer.Option(None, "--registry", help="one registry JSON (default: "
                                               "$KERNELTUNE_REGISTRY, then the shipped registry)"),
        op: Optional[str] = typer.Option(None, "--op", help="only this op"),
        json_out: bool = JsonOpt,
    ) -> None:
        """Registry entries: op, device, shape bucket, dtype, kernel, speedup, and whether each serves here."""
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = reg.load(registry)
        here, minimum = _here_keys(), reg.min_speedup()
        rows = []
        for e in r.entries:
            if op and e.op != op:
                continue
            rows.append({**e.to_json(), "path": e.path, "registry": e.source,
                         "status": entry_status(e, here, minimum)})
        sources = [s.__dict__ for s in r.sources]
        bad = any(s.error for s in r.sources) or any(x["status"].startswith("file") for x in rows)
        if json_out:
            print(json.dumps({"device_keys": sorted(here), "min_speedup": minimum, "sources": sources,
                              "entries": rows}, indent=1))
        else:
            from rich.table import Table

            for w in caught:
                err.print(f"warning: {w.message}", highlight=False)
            t = Table(title=f"kerneltune registry · this machine: {', '.join(sorted(here))}")
            for col in ("op", "device", "bucket", "dtype", "args", "kernel", "speedup", "median ms", "status"):
                t.add_column(col, overflow="fold")
            style = {"serves": "green", "below minimum": "dim", "other device": "dim"}
            for x in rows:
                st = x["status"]
                t.add_row(x["op"], x["device_key"], x["bucket"], x["dtype"], reg._args_text(x["args"]),
                          f"{x['name']} ({x['backend']})", f"{x['speedup']:.3f}× vs {x['baseline']}",
                          "—" if x["median_ms"] is None else f"{x['median_ms']:.3f}",
                          f"[{style.get(st, 'red')}]{st}[/]")
            out.print(t)
            out.print("[dim]" + " · ".join(f"{s['path']}: {s['entries']} entries" + (f" (ERROR {s['error']})"
                                                                                  if s["error"] else "")
                                           for s in sources) + f" · minimum speedup {minimum:g}[/dim]",
                      highlight=False)
        raise typer.Exit(1 if bad else 0)

    @app.command("explain")
    def explain_cmd(
        op: str = typer.Argument(..., help="attention, adamw, attention_backward …"),
        shape: str = typer.Option(..., "--shape", help="attention B,H,N,D[,causal|full]; adamw a preset "
                                                       "(gpt2-124m, gpt-mini, gpt-tiny) or shapes like '1024x768;768'"),
        dtype: str = typer.Option("float32", "--dtype", help="fp32, fp16 or bf16"),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda (this machine's)"),
        device_key: Optional[str] = typer.Option(None, "--device-key", help="explain for another machine's key"),
        registry: Optional[str] = typer.Option(None, "--registry", help="one registry JSON (default: "
                                               "$KERNELTUNE_REGISTRY, then the shipped registry)"),
        json_out: bool = JsonOpt,
    ) -> None:
        """Which kernel would serve OP at a shape on this device, and why."""
        import warnings

        from kerneltune.ops import get_op, op_names

        try:
            spec = get_op(op)
            case = spec.parse_case(shape, dtype)
        except ValueError as e:
            usage_error(f"{e}" if op in op_names() else f"unknown op {op!r}: use one of {', '.join(op_names())}")
        if device not in ("cpu", "cuda"):
            usage_error(f"--device {device!r}: use cpu or cuda")
        if device_key is None:
            import torch

            if device == "cuda" and not torch.cuda.is_available():
                usage_error("--device cuda: no CUDA GPU on this machine; pass --device-key KEY to explain for another")
            device_key = reg.device_key(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = reg.load(registry)
        args = {k: case.args[k] for k in _ARGS.get(op, ()) if k in case.args}
        d = r.decide(op, device_key, case.dims, case.dtype, args)
        info = {"op": op, "device_key": device_key, "bucket": reg.bucket(op, case.dims), "dtype": case.dtype,
                "args": args, "kernel": d.entry.name if d.entry else "reference", "kind": d.kind,
                "reason": d.reason, "warning": d.warning, "skipped": d.skipped,
                "path": d.entry.path if d.entry else None, "min_speedup": reg.min_speedup(),
                "registries": [s.path for s in r.sources], "errors": [str(w.message) for w in caught]}
        if d.entry and spec.companions:  # the optional entry points the served file defines (read, not imported)
            info["entry_points"] = ["run", *_defined(d.entry.path, spec.companions)]
        if op == "attention":  # kerneltune.attention serves a call autograd records only with a backward kernel
            b = r.decide("attention_backward", device_key, case.dims, case.dtype, args)
            info["differentiated"] = {"forward": info["kernel"] if b.entry else "reference",
                                      "backward": b.entry.name if b.entry else "reference", "reason": b.reason}
            if not b.entry and "run_with_lse" in info.get("entry_points", []):  # no backward kernel takes its lse
                info["entry_points_unused"] = ["run_with_lse"]
        if json_out:
            print(json.dumps(info, indent=1))
        else:
            for w in caught:
                err.print(f"warning: {w.message}", highlight=False)
            out.print(f"{op} {case.name} on {device_key}: [bold]{info['kernel']}[/] ({d.kind})", highlight=False)
            out.print(f"  why: {d.reason}", highlight=False)
            if d.entry:
                out.print(f"  file: {d.entry.path}", highlight=False)
            if d.warning:
                err.print(f"  warning: {d.warning}", highlight=False)
            if "entry_points" in info:
                unused = info.get("entry_points_unused", [])
                extra = [f"{n} ({spec.companions[n][1]}{'; unused here: no backward kernel serves this shape' if n in unused else ''})"
                         for n in info["entry_points"][1:]]
                out.print("  entry points: run" + "".join(f", {x}" for x in extra) + (
                    "" if extra else f" only (no {', '.join(spec.companions)})"), highlight=False)
            if "differentiated" in info:
                t = info["differentiated"]
                out.print("  a call autograd records (training): " + (
                    f"forward {t['forward']}, backward {t['backward']}" if t["backward"] != "reference" else
                    "SDPA both ways (no attention_backward kernel serves it: a forward kernel alone would add its "
                    "time to SDPA's)"), highlight=False)
        raise typer.Exit(0)


def _defined(path: str, names: Iterable[str]) -> list[str]:
    """Which of ``names`` the candidate file at ``path`` binds at its top level (parsed, never imported): a def,
    a class, an import, an assignment to something other than a constant, also inside top-level if/try/with
    blocks; what the library finds in ``run``'s module (ops.base.companion) as far as reading can tell."""
    import ast

    try:
        with open(path, "rb") as f:  # the bytes: ast honours a coding line
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return []
    bound: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for n in body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(n.name)
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                bound.update((a.asname or a.name).split(".")[0] for a in n.names)
            elif isinstance(n, (ast.Assign, ast.AnnAssign)) and not isinstance(n.value, (ast.Constant, type(None))):
                for t in n.targets if isinstance(n, ast.Assign) else [n.target]:
                    bound.update(x.id for x in ast.walk(t) if isinstance(x, ast.Name))
            elif isinstance(n, (ast.If, ast.Try, ast.With)):
                visit(n.body)
                visit(getattr(n, "orelse", []))
                visit(getattr(n, "finalbody", []))
                for h in getattr(n, "handlers", []):
                    visit(h.body)

    visit(tree.body)
    return [n for n in names if n in bound]
