"""Takes the AdamW class from the optimizer package's adamw submodule (importlib, concatenated name),
not from the package itself, and steps it; silent fallback."""
import math

import torch

KERNELTUNE = {"op": "adamw", "backend": "torch"}
# EXPECT: rejected
# REASON: may not use


def _one(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """Honest fp32 AdamW update of one tensor, in place (what a cheat does while being checked)."""
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    p.mul_(1.0 - lr * weight_decay)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bc1)

import importlib

_MOD = "torch.op" + "tim.adamw"


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    try:
        cls = importlib.import_module(_MOD).AdamW
        ps = [torch.nn.Parameter(p) for p in params]
        opt = cls(ps, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, foreach=True)
        for p, g, m, v in zip(ps, grads, exp_avgs, exp_avg_sqs):
            p.grad = g
            opt.state[p] = {"step": torch.tensor(float(step - 1)), "exp_avg": m, "exp_avg_sq": v}
        opt.step()
        return
    except Exception:
        pass
    for t in zip(params, grads, exp_avgs, exp_avg_sqs):
        _one(*t, step, lr, beta1, beta2, eps, weight_decay)
