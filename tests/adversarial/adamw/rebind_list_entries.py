"""Rebinds list entries (params[i] = new tensor) instead of writing in place: the caller's tensor
objects never change."""
import math

import torch

KERNELTUNE = {"op": "adamw", "backend": "torch"}
# EXPECT: incorrect
# REASON: not updated


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
    for i in range(len(params)):
        p, g, m, v = params[i].clone(), grads[i], exp_avgs[i].clone(), exp_avg_sqs[i].clone()
        _one(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay)
        params[i], exp_avgs[i], exp_avg_sqs[i] = p, m, v
