"""The proposer interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kerneltune.evaluate.static import CandidateFile


@dataclass
class Proposal:
    candidate: CandidateFile
    origin: str                      # templates | claude | replay | seed
    parent: str | None = None        # hash of the parent candidate, if any
    key: Any = None                  # the proposer's own handle (a Point for templates)
    cost_usd: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


class Proposer:
    """ask for proposals; tell results. ``propose`` returns at most ``n`` (fewer when exhausted)."""

    name = "base"

    def propose(self, n: int) -> list[Proposal]:
        raise NotImplementedError

    def tell(self, proposal: Proposal, result: dict[str, Any]) -> None:
        raise NotImplementedError

    def replay(self, key: Any, result: dict[str, Any] | None) -> None:
        """Feed a finished evaluation of an earlier session back in (for --resume)."""

    def exhausted(self) -> bool:
        return False

    @property
    def cost_usd(self) -> float:
        return 0.0
