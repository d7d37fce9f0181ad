"""Edge cases of Claude's answers and of the API, through the real anthropic SDK against the simulated API:
a 200 whose body is no message, the choice among several code blocks, answers cut off at max_tokens or
refused, and the retries recorded for requests that failed.
"""

from __future__ import annotations

import json

import pytest

from kerneltune.propose import prompts
from kerneltune.store import Store
from kerneltune.store.messages import messages_of_run

from .fake_api import error_body
from .test_claude import _statuses, answer, good, make, text


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "kt.db"))
    s.add_run("run-a", op="attention", device_key="cpu:test", proposer="claude", strategy=None, options={})
    yield s
    s.close()


HTML = "<html><body><h1>502 Bad Gateway</h1>upstream hiccup</body></html>"


# -- a 200 that is not a message ------------------------------------------------------------------------------

def test_a_200_that_is_not_a_message_is_an_ordinary_failure_with_its_body_kept(api, store):
    bodies = [("application/json", HTML),                          # not JSON, said to be JSON
              ("text/html", HTML),                                 # not JSON, honestly labelled
              ("application/json", json.dumps({"type": "message", "role": "assistant"})),   # no content, no usage
              ("application/json", "[1, 2, 3]")]                   # JSON, not an object
    api.actions = [("raw", 200, ctype, body) for ctype, body in bodies] + [text(good())]
    p = make(store, max_retries=0, max_failures=5)
    props = p.propose(1)
    assert len(props) == 1 and props[0].candidate.source == good() and not p.stop_reason
    rows = messages_of_run(store, "run-a")
    assert [r["outcome"] for r in rows] == ["error"] * 4 + ["candidate"]
    for row, (_ctype, body) in zip(rows, bodies):
        assert row["problem"].startswith("invalid response from the API"), row["problem"]
        assert "\n" not in row["problem"] and row["response"] == body       # the body read is kept
        assert row["cost_usd"] == 0 and row["request_id"] is not None and row["retries"] == 0
    assert "502 Bad Gateway" in rows[0]["problem"]                        # says what came back
    assert p.cost_usd == pytest.approx(rows[-1]["cost_usd"])


def test_invalid_responses_in_a_row_stop_after_max_failures_not_at_the_first(api, store):
    api.default = lambda body, n: ("raw", 200, "application/json", HTML)
    p = make(store, max_retries=0, max_failures=3)
    assert p.propose(1) == []
    assert len(api.requests) == 3 and _statuses(store) == ["error"] * 3
    assert p.stop_reason.startswith("3 Claude requests in a row gave no candidate; the last: invalid response from "
                                    "the API"), p.stop_reason
    assert "refused" not in p.stop_reason


def test_an_invalid_response_to_a_repair_is_tried_again(api, store):
    api.default = lambda body, n: text(good(f"r{n}"))
    p = make(store)
    (a,) = p.propose(1)
    p.tell(a, {"status": "incorrect", "reason": "wrong values", "hash": a.candidate.hash, "name": a.candidate.name})
    api.actions = [("raw", 200, "application/json", HTML)]
    (b,) = p.propose(1)
    assert b.info["kind"] == "repair" and b.parent == a.candidate.hash     # the request failed, not the repair
    assert _statuses(store) == ["candidate", "error", "candidate"]


# -- which code block is the candidate ------------------------------------------------------------------------

SNIPPET = "```python\ndef run(q, k, v, causal=True, scale=None):\n    s = ...  # fp32 accumulation\n```\n"


def test_a_key_change_snippet_after_the_file_is_not_the_candidate(api, store):
    api.actions = [("text", answer(good()) + "\nThe key change is in run:\n\n" + SNIPPET)]
    (prop,) = make(store).propose(1)
    assert prop.candidate.source == good()


def test_parse_answer_prefers_blocks_with_both_kerneltune_and_run():
    meta_only = '```python\nKERNELTUNE = {"op": "attention", "backend": "torch"}\n```\n'
    full_a, full_b = good("a"), good("b")
    pick = lambda *parts: prompts.parse_answer("\n".join(parts), "attention").source  # noqa: E731
    assert pick(meta_only, f"```python\n{full_a}```", SNIPPET, meta_only) == full_a   # both beat either
    assert pick(f"```python\n{full_a}```", f"```python\n{full_b}```", SNIPPET) == full_b   # the last of the tier
    assert pick(SNIPPET, meta_only, SNIPPET).startswith("KERNELTUNE")            # KERNELTUNE beats run alone
    assert pick("```python\nx = 1\n```", SNIPPET, "```python\ny = 2\n```").startswith("def run")


# -- stop reasons ---------------------------------------------------------------------------------------------

def test_an_answer_cut_off_before_any_code_says_so_and_how_to_raise_the_limit(api, store):
    prose = "Let me think step by step about tiling. " * 50
    api.actions = [("text", prose, None, "max_tokens"), text(good())]
    p = make(store, max_tokens=1000)
    (prop,) = p.propose(1)
    rows = messages_of_run(store, "run-a")
    assert [r["outcome"] for r in rows] == ["malformed", "candidate"] and rows[0]["stop_reason"] == "max_tokens"
    problem = rows[0]["problem"]
    assert "cut off" in problem and "1000" in problem and "--max-tokens" in problem
    assert "no ```python code block" not in problem
    nxt = api.user_text(1)                           # the next request tells Claude what really happened
    assert "cut off" in nxt and "no ```python code block" not in nxt


def test_cut_off_answers_in_a_row_stop_with_the_advice_to_raise_max_tokens(api, store):
    api.default = lambda body, n: ("text", "Thinking about tiles. " * 20, None, "max_tokens")
    p = make(store, max_failures=2, max_tokens=500)
    assert p.propose(1) == []
    assert "2 Claude requests in a row" in p.stop_reason and "--max-tokens" in p.stop_reason


def test_a_refusal_is_recorded_as_such_and_not_sent_back(api, store):
    api.actions = [("text", "I can't help with that.", None, "refusal"), text(good())]
    p = make(store)
    (prop,) = p.propose(1)
    rows = messages_of_run(store, "run-a")
    assert [r["outcome"] for r in rows] == ["malformed", "candidate"] and rows[0]["stop_reason"] == "refusal"
    assert "refus" in rows[0]["problem"] and "no ```python code block" not in rows[0]["problem"]
    assert rows[0]["cost_usd"] > 0                                     # paid for, counted
    nxt = api.user_text(1)
    assert "refus" not in nxt.lower() and "malformed" not in nxt and "can't help" not in nxt


def test_refusals_count_towards_max_failures(api, store):
    api.default = lambda body, n: ("text", "I can't help with that.", None, "refusal")
    p = make(store, max_failures=2)
    assert p.propose(1) == [] and len(api.requests) == 2
    assert "2 Claude requests in a row" in p.stop_reason and "refus" in p.stop_reason


# -- retries of failed requests -------------------------------------------------------------------------------

def test_the_retries_of_a_failed_request_are_stored(api, store):
    api.default = lambda body, n: ("error", 529, {}, error_body("overloaded_error", "Overloaded"))
    p = make(store, max_retries=2, max_failures=1)
    assert p.propose(1) == [] and len(api.requests) == 3
    (m,) = messages_of_run(store, "run-a")
    assert m["outcome"] == "error" and m["retries"] == 2


def test_retries_before_a_fatal_error_or_an_invalid_body_are_stored(api, store):
    api.actions = [("error", 500, {}, error_body("api_error", "x")), ("raw", 200, "application/json", HTML),
                   ("error", 500, {}, error_body("api_error", "x")), ("error", 400, {}, error_body("invalid_request_error", "bad"))]
    p = make(store, max_retries=3)
    assert p.propose(1) == [] and len(api.requests) == 4
    rows = messages_of_run(store, "run-a")
    assert [(r["outcome"], r["retries"]) for r in rows] == [("error", 1), ("error", 1)]
    assert rows[0]["problem"].startswith("invalid response") and "400" in rows[1]["problem"]
    assert "refused" in p.stop_reason and "400" in p.stop_reason


def test_the_retries_of_a_request_that_timed_out_are_stored(api, store):
    api.delay = 1.0
    api.default = lambda body, n: text(good())
    p = make(store, max_retries=1, max_failures=1, timeout=0.3)
    assert p.propose(1) == []
    (m,) = messages_of_run(store, "run-a")
    assert m["outcome"] == "error" and "Timeout" in m["problem"] and m["retries"] == 1


def test_a_body_a_strict_sdk_client_rejects_is_an_ordinary_failure(api, store):
    import anthropic

    strict = anthropic.Anthropic(max_retries=0, _strict_response_validation=True)
    api.actions = [("raw", 200, "application/json", json.dumps({"type": "message", "content": "oops"})), text(good())]
    p = make(store, client=strict)
    (prop,) = p.propose(1)
    rows = messages_of_run(store, "run-a")
    assert [r["outcome"] for r in rows] == ["error", "candidate"] and not p.stop_reason
    assert rows[0]["problem"].startswith("invalid response from the API") and "oops" in rows[0]["response"]
