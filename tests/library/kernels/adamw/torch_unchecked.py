"""An AdamW kernel with run_unchecked for the library's tests on CPU: torch's AdamW update in fp32 torch, per
tensor. run checks the contract's preconditions and raises on a broken one; run_unchecked checks nothing. Each
call is recorded in CALLS ("run" or "run_unchecked"), so a test sees which entry point the library took.
WRONG = True makes run_unchecked skip the weight decay (a bug the library must catch on its first use under
KERNELTUNE_VERIFY)."""
import torch

KERNELTUNE = {"op": "adamw", "backend": "torch"}
CALLS = []
WRONG = False


def _update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay):
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    with torch.no_grad():
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
            p.mul_(1.0 - lr * weight_decay)
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            p.addcdiv_(m, v.sqrt().div_(bc2 ** 0.5).add_(eps), value=-lr / bc1)


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    CALLS.append("run")
    for lst in (params, grads, exp_avgs, exp_avg_sqs):
        if len(lst) != len(params) or any(t.dtype != torch.float32 or not t.is_contiguous() for t in lst):
            raise TypeError("every tensor float32 and contiguous, four lists of one length")
        if any(t.shape != p.shape for t, p in zip(lst, params)):
            raise ValueError("tensor i of every list must have one shape")
    _update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay)


def run_unchecked(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    CALLS.append("run_unchecked")
    _update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, 0.0 if WRONG else weight_decay)
