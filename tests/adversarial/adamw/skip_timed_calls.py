"""AdamW that skips the whole update on a timed call: the timing loop steps again and again with the same
gradients, while every checked call brings new ones (the re-verification after timing too: ~1% of them changed,
then new ones). So only a check of what the timed calls changed (their digest) sees the skipped steps."""
import math

import torch

KERNELTUNE = {"op": "adamw", "backend": "torch"}
# EXPECT: incorrect
# REASON: what the timed calls computed


def _one(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    p.mul_(1.0 - lr * weight_decay)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-lr / bc1)


_last = [None]  # a copy of the previous call's first gradient


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    last = _last[0]
    timed = (last is not None and bool(grads) and last.shape == grads[0].shape
             and torch.equal(last, grads[0]))
    _last[0] = grads[0].clone() if grads else None
    if not timed:
        for t in zip(params, grads, exp_avgs, exp_avg_sqs):
            _one(*t, step, lr, beta1, beta2, eps, weight_decay)
