"""An honest run, and a run_unchecked (the entry point kerneltune.optim calls on a step it has checked
itself) that ignores weight decay: the evaluator checks run_unchecked on its own cases."""
import math

KERNELTUNE = {"op": "adamw", "backend": "torch"}
# EXPECT: incorrect
# REASON: unchecked


def _one(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    p.mul_(1.0 - lr * weight_decay)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bc1)


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    for t in zip(params, grads, exp_avgs, exp_avg_sqs):
        _one(*t, step, lr, beta1, beta2, eps, weight_decay)


def run_unchecked(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    for t in zip(params, grads, exp_avgs, exp_avg_sqs):
        _one(*t, step, lr, beta1, beta2, eps, 0.0)
