"""Proposers: where candidate files come from. A proposal is a candidate file plus its parentage and
origin. ``templates`` (offline) walks the knob space of template candidates with a search strategy."""

from kerneltune.propose.base import Proposal, Proposer

__all__ = ["Proposal", "Proposer"]
