"""Calls aten's fused AdamW op through torch.ops.aten under an obfuscated name, silent fallback."""
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

_NAME = "_fused_" + "adamw_"


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    try:
        steps = [torch.tensor(float(step)) for _ in params]
        getattr(torch.ops.aten, _NAME)(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1,
                                       beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False,
                                       maximize=False)
        return
    except Exception:
        pass
    for t in zip(params, grads, exp_avgs, exp_avg_sqs):
        _one(*t, step, lr, beta1, beta2, eps, weight_decay)
