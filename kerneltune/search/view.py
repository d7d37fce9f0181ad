"""The live view of a search (rich): progress, best speedup so far, a small leaderboard, failures by kind.
Without a terminal it prints one line per finished evaluation instead."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from kerneltune.search.runner import Progress


def render(p: Progress) -> Any:
    elapsed = time.monotonic() - p.started
    rate = p.evaluated / (elapsed / 60) if elapsed > 1 else 0.0  # this session's evaluations over its time
    head = Text.assemble(
        (f"{p.run_id}", "bold"), f"  {p.op} on {p.device} · proposer {p.proposer}\n",
        f"{p.done}/{p.budget} results ({p.cached} cached, " + (f"{p.replayed} from before the resume, " if p.replayed else "")
        + f"{p.in_flight} running) · {elapsed:5.0f} s · "
        f"{rate:.1f} evaluations/min",
        (f" · ${p.cost_usd:.4f}" if p.cost_usd else ""),
    )
    bar = ProgressBar(total=max(p.budget, 1), completed=p.done, width=60)
    best = p.best
    best_line = Text(f"best: {best['name']}  {best['speedup']:.3f}× (median {best['median_ms']:.3f} ms)",
                     style="green") if best else Text("best: — (nothing passed yet)", style="dim")
    board = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    for col in ("#", "candidate", "speedup", "median ms", "p20–p80", "params"):
        board.add_column(col)
    for i, r in enumerate(p.board[:5], 1):
        params = ", ".join(f"{k}={v}" for k, v in (r.get("params") or {}).items())
        board.add_row(str(i), r["name"], f"{r['speedup']:.3f}×", f"{r['median_ms']:.3f}",
                      f"{r['p20_ms']:.3f}–{r['p80_ms']:.3f}", params[:70])
    fails = ", ".join(f"{k} {v}" for k, v in sorted(p.by_status.items()) if k != "passed") or "none"
    return Panel(Group(head, bar, best_line, board, Text(f"failures: {fails}   last: {p.last}", style="dim")),
                 title="kerneltune search", border_style="cyan")


class LiveView:
    def __init__(self, enabled: bool) -> None:
        self.console = Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.plain = enabled and not self.enabled
        self._live: Live | None = None
        self._last_done = -1

    def __enter__(self) -> "LiveView":
        if self.enabled:
            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def update(self, p: Progress) -> None:
        if self._live is not None:
            self._live.update(render(p))
        elif self.plain and p.done != self._last_done:
            self._last_done = p.done
            best = f"{p.best['speedup']:.3f}× ({p.best['name']})" if p.best else "—"
            print(f"[{p.done}/{p.budget}] {p.last} · best {best}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
