"""Modifies grads: scales g in place by (1 - beta1) to save a temporary (the update itself is
right)."""
import math

import torch

KERNELTUNE = {"op": "adamw", "backend": "torch"}
# EXPECT: rejected
# REASON: modified its input


def _one(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """Honest fp32 AdamW update of one tensor, in place (what a cheat does while being checked)."""
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    p.mul_(1.0 - lr * weight_decay)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bc1)

def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p.mul_(1.0 - lr * weight_decay)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        m.mul_(beta1).add_(g.mul_(1.0 - beta1))
        p.addcdiv_(m, v.sqrt().div_(bc2_sqrt).add_(eps), value=-lr / bc1)
