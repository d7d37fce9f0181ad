"""Proposers by name: ``templates`` (offline autotuner), ``claude`` (the Anthropic API), ``replay`` (the stored
answers of an earlier Claude run) and ``auto`` (claude when a key and the SDK are there, else templates).

Every error is a SearchError with one line saying what to do. The returned proposer carries
``chosen_because``: one sentence saying which proposer runs and why (the CLI prints it).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from kerneltune.propose.base import Proposer

NAMES = ("auto", "templates", "claude", "replay")
# --option KEY=VALUE pairs that belong to the Claude proposer rather than to the strategy
PROPOSER_OPTION_KEYS = ("repair_attempts", "max_retries", "max_failures", "api_timeout", "price")


def split_options(pairs: list[str]) -> tuple[list[str], dict[str, str]]:
    """--option pairs -> (the strategy's pairs, the proposer's options as strings)."""
    strategy: list[str] = []
    proposer: dict[str, str] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if sep and key in PROPOSER_OPTION_KEYS:
            proposer[key] = raw
        else:
            strategy.append(pair)
    return strategy, proposer
NO_KEY = "ANTHROPIC_API_KEY is not set: export ANTHROPIC_API_KEY=sk-ant-... (or use --proposer templates)"
NO_SDK = "the anthropic SDK is not installed: pip install 'kerneltune[claude]' (or use --proposer templates)"


def _error(msg: str) -> Exception:
    from kerneltune.search.runner import SearchError

    return SearchError(" ".join(msg.split()))


def sdk_available() -> bool:
    try:
        return importlib.util.find_spec("anthropic") is not None
    except (ImportError, ValueError):
        return False


def has_key() -> bool:
    return bool(os.environ.get("ANTHROPIC_API_KEY", "").strip())


def make_proposer(cfg: Any, store: Any = None, run_id: str | None = None) -> Proposer:
    """The proposer ``cfg.proposer`` names (cfg: kerneltune.search.runner.SearchConfig).

    ``auto`` is resolved here, and ``cfg.proposer`` is set to the choice, so the run is stored (and resumed)
    with the proposer that actually ran."""
    name = cfg.proposer
    if name == "auto":
        if has_key() and sdk_available():
            p = _claude(cfg, store, run_id)
            cfg.proposer = "claude"
            p.chosen_because = (f"proposer auto: ANTHROPIC_API_KEY is set and the anthropic SDK is installed, so Claude "
                                f"({p.model}) proposes")
            return p
        p = _templates(cfg)
        cfg.proposer = "templates"
        why = "ANTHROPIC_API_KEY is not set" if not has_key() else "the anthropic SDK is not installed"
        p.chosen_because = (f"proposer auto: {why}, so the offline templates autotuner proposes "
                            "(export ANTHROPIC_API_KEY to let Claude propose)")
        return p
    if name == "templates":
        p = _templates(cfg)
        p.chosen_because = "proposer templates: the offline autotuner over the template candidates' knob spaces"
        return p
    if name == "claude":
        if not has_key():
            raise _error(NO_KEY)
        if not sdk_available():
            raise _error(NO_SDK)
        p = _claude(cfg, store, run_id)
        p.chosen_because = f"proposer claude: Claude ({p.model}) proposes"
        return p
    if name == "replay":
        from kerneltune.propose.replay import ReplayError, ReplayProposer

        src = (cfg.proposer_options or {}).get("from_run")
        if not src:
            raise _error("--proposer replay needs --from RUN (a Claude run in this store; see kerneltune runs)")
        if store is None:
            raise _error("--proposer replay needs the store that holds run " + str(src))
        try:
            p = ReplayProposer(store, str(src), cfg.op)
        except ReplayError as e:
            raise _error(str(e)) from None
        p.chosen_because = f"proposer replay: the {p.total} stored Claude candidates of run {p.from_run}, in order, no network"
        return p
    raise _error(f"unknown proposer {name!r}: use one of {', '.join(NAMES)}")


def _templates(cfg: Any) -> Proposer:
    from kerneltune.propose.templates import TemplatesProposer
    from kerneltune.search.space import Space, SpaceError

    try:
        space = Space.discover(cfg.op, cfg.device, cfg.candidate_dirs)
    except SpaceError as e:
        raise _error(str(e)) from None
    return TemplatesProposer(space, cfg.strategy, cfg.seed, cfg.strategy_options)


def _claude(cfg: Any, store: Any, run_id: str | None) -> Proposer:
    from kerneltune.ops import get_op
    from kerneltune.propose.claude import ClaudeProposer, options_from

    spec = get_op(cfg.op)
    try:
        from kerneltune.search.runner import timed_cases

        shape = (timed_cases(spec, cfg.device, cfg.shapes, cfg.dtype) or spec.timed_cases(cfg.device))[0].name
        kwargs = options_from(cfg.proposer_options or {})
        return ClaudeProposer(cfg.op, cfg.device, store=store, run_id=run_id, candidate_dirs=list(cfg.candidate_dirs),
                              shape=shape, max_cost=cfg.max_cost, **kwargs)
    except ImportError:
        raise _error(NO_SDK) from None
    except ValueError as e:
        raise _error(str(e)) from None
