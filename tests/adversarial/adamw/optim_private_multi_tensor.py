"""Calls _multi_tensor_adam of the optimizer package's adam module (the private foreach implementation behind
PyTorch's AdamW(foreach=True)) directly with decoupled_weight_decay=True: the optimizer's own code under a name
no tripwire covers."""
import math

import torch

KERNELTUNE = {"op": "adamw", "backend": "torch"}
# EXPECT: rejected

import importlib

_MOD = "torch.op" + "tim.adam"


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    fn = getattr(importlib.import_module(_MOD), "_multi_tensor_adam")
    steps = [torch.tensor(float(step - 1)) for _ in params]
    fn(params, grads, exp_avgs, exp_avg_sqs, [], steps, None, None, amsgrad=False, has_complex=False,
       beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False, capturable=False,
       differentiable=False, decoupled_weight_decay=True)
