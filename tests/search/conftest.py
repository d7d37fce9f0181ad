"""A small knob space with a known landscape, and recorded evaluations over it."""

from __future__ import annotations

import textwrap

import pytest

from kerneltune.search.space import Space, load_template

TEMPLATE = '''
"""Test template: torch AdamW with knobs that change the speed, not the result."""
import torch

KERNELTUNE = {
    "op": "adamw",
    "backend": "torch",
    "params": {"A": 1, "B": "x", "C": 0},
    "space": {"A": [1, 2, 3, 4, 5, 6], "B": ["x", "y", "z"], "C": [0, 1, 2, 3]},
    "restrictions": ["not (A == 6 and C == 3)"],
}
P = KERNELTUNE["params"]


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.addcdiv_(m, v.sqrt().div_(bc2 ** 0.5).add_(eps), value=-lr / bc1)
'''


def landscape(point) -> float | None:
    """A recorded 'speedup' per point: one optimum at A=5, B=z, C=2; B=y always fails."""
    d = point.as_dict()
    if d["B"] == "y":
        return None
    return 1.0 + 0.3 * (1 - abs(d["A"] - 5) / 5) + 0.2 * (d["B"] == "z") + 0.1 * (1 - abs(d["C"] - 2) / 3)


@pytest.fixture
def template_dir(tmp_path):
    d = tmp_path / "tpl"
    d.mkdir()
    (d / "torch_tpl.py").write_text(textwrap.dedent(TEMPLATE))
    return str(d)


@pytest.fixture
def space(template_dir):
    return Space([load_template(f"{template_dir}/torch_tpl.py")])
