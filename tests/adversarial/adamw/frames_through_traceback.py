"""Walks its own stack through the stdlib's traceback module (imported under a name built at run time), to reach
the worker's timing loop: which call of a block it is, so that it could do a block's work in its last call. The
audit hook refuses a stack walk the candidate asks traceback (or inspect) for."""
import importlib
import math

import torch

KERNELTUNE = {"op": "adamw", "backend": "torch"}
# EXPECT: rejected
# REASON: the evaluator's own state


def _step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay):
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -lr / bc1)


def _in_timing_loop():
    tb = importlib.import_module("trace" + "back")
    for frame, _ in tb.walk_stack(None):
        names = getattr(frame, "f_" + "locals")
        if "vouch" in names and "reps" in names:
            return True
    return False


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    if params:
        _in_timing_loop()
        _step(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay)
