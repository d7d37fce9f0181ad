"""The replay proposer: the candidates of an earlier Claude run, re-made from its stored responses, in the
order they were received. No network, no key, no cost: ``kerneltune search OP --proposer replay --from RUN``
reproduces a run's candidates exactly (same sources, same hashes) for a new evaluation — on another
device, another store, after an evaluator change.

The sources are re-parsed from the stored answer text with the same parser the Claude proposer used
(prompts.parse_answer), so what is replayed is what Claude said, not a copy of what was proposed.
"""

from __future__ import annotations

from typing import Any

from kerneltune.propose import prompts
from kerneltune.propose.base import Proposal, Proposer
from kerneltune.store import messages as msgstore


class ReplayError(ValueError):
    pass


class ReplayProposer(Proposer):
    name = "replay"

    def __init__(self, store: Any, from_run: str, op: str) -> None:
        row = store.run(from_run)
        if row is None:
            raise ReplayError(f"--from {from_run}: no such run in {store.path} (see kerneltune runs)")
        self.from_run = row["id"]
        if row["op"] != op:
            raise ReplayError(f"--from {self.from_run}: that run searched {row['op']!r}, not {op!r}")
        rows = [m for m in msgstore.messages_of_run(store, self.from_run) if m["outcome"] == "candidate"]
        if not rows:
            raise ReplayError(f"--from {self.from_run}: no stored Claude answers with a candidate in that run")
        self.op = op
        self.queue: list[tuple[dict[str, Any], str]] = []
        self.mismatches: list[int] = []
        for m in rows:
            parsed = prompts.parse_answer(m["text"] or "", op)
            if parsed.source is None:
                continue
            from kerneltune.propose.claude import candidate_of

            if candidate_of(parsed.source).hash != m["candidate_hash"]:
                self.mismatches.append(m["id"])   # the parser changed since: replay what it gives now, say so
            self.queue.append((m, parsed.source))
        self.total = len(self.queue)
        self.done: set[int] = set()
        self.stop_reason = ""

    @property
    def cost_usd(self) -> float:
        return 0.0

    def exhausted(self) -> bool:
        return bool(self.stop_reason)

    def propose(self, n: int) -> list[Proposal]:
        from kerneltune.propose.claude import candidate_of

        out: list[Proposal] = []
        while self.queue and len(out) < n:
            m, source = self.queue.pop(0)
            if m["id"] in self.done:
                continue
            self.done.add(m["id"])
            cand = candidate_of(source)
            info = {"replay_of": self.from_run, "message_id": m["id"], "attempt": m["attempt"], "kind": m["kind"],
                    "model": m["model"], "hash": cand.hash, "parent": m["parent"]}
            out.append(Proposal(candidate=cand, origin="replay", parent=m["parent"], key=info, cost_usd=0.0,
                                info=info))
        if not out and not self.stop_reason:
            self.stop_reason = f"replayed all {self.total} candidates of run {self.from_run}"
        return out

    def tell(self, proposal: Proposal, result: dict[str, Any]) -> None:
        pass

    def point_of(self, info: dict[str, Any]) -> Any:
        return info

    def replay(self, key: Any, result: dict[str, Any] | None) -> None:
        if isinstance(key, dict) and key.get("message_id") is not None:
            self.done.add(int(key["message_id"]))
