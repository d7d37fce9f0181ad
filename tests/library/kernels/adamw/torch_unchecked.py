"""An AdamW kernel with run_unchecked for the library's tests on CPU: torch's AdamW update in torch, per tensor
(in each moment's own dtype). run checks the contract's preconditions and raises on a broken one, unless
LENIENT; run_unchecked checks nothing. Each call is recorded in CALLS ("run" or "run_unchecked"), so a test
sees which entry point the library took. Bugs the library must survive: WRONG makes run_unchecked leave out the
weight decay (caught on its first use under KERNELTUNE_VERIFY); HALF_THEN_RAISE makes it update the first
tensor and then raise (what it changed must be put back before torch's step runs)."""
import torch

KERNELTUNE = {"op": "adamw", "backend": "torch"}
CALLS = []
WRONG = False
HALF_THEN_RAISE = False
LENIENT = False


def _update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, stop_after=None):
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    with torch.no_grad():
        for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            if i == stop_after:
                raise RuntimeError("a kernel that fails half-way")
            p.mul_(1.0 - lr * weight_decay)
            m.mul_(beta1).add_(g, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            p.sub_((m * (lr / bc1) / (v.sqrt() / bc2 ** 0.5 + eps)).to(p.dtype))


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    CALLS.append("run")
    for lst in (params, grads, exp_avgs, exp_avg_sqs):
        if LENIENT:
            break
        if len(lst) != len(params) or any(t.dtype != torch.float32 or not t.is_contiguous() for t in lst):
            raise TypeError("every tensor float32 and contiguous, four lists of one length")
        if any(t.shape != p.shape for t, p in zip(lst, params)):
            raise ValueError("tensor i of every list must have one shape")
    _update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay)


def run_unchecked(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    CALLS.append("run_unchecked")
    _update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, 0.0 if WRONG else weight_decay,
            stop_after=1 if HALF_THEN_RAISE else None)
