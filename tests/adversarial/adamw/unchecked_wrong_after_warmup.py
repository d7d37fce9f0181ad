"""An honest run, and a run_unchecked that is right for its first 9 calls (every check case marked unchecked,
3 seeds each) and then drops the largest tensor's update, as a kernel that switches to a faster path once warm
might: the evaluator re-verifies the timed case through run_unchecked after timing (the check cases alone would
pass it)."""
import math

KERNELTUNE = {"op": "adamw", "backend": "torch"}
# EXPECT: incorrect
# REASON: wrong after


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
    _CALLS[0] += 1
    largest = max(range(len(params)), key=lambda i: params[i].numel()) if params else -1
    for i, t in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if not (_CALLS[0] > 9 and i == largest):
            _one(*t, step, lr, beta1, beta2, eps, weight_decay)


_CALLS = [0]
