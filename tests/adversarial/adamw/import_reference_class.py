"""Calls kerneltune's adamw reference through the class, type(SPEC).reference(SPEC, inputs),
sidestepping a tripwire set only on the SPEC instance, and copies the fp64 result into the buffers."""
import math

import torch

KERNELTUNE = {"op": "adamw", "backend": "torch"}
# EXPECT: rejected
# REASON: reference

import importlib

_PKG = "kern" + "eltune"


def run(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay):
    ops = importlib.import_module(_PKG + ".ops.adamw")
    base = importlib.import_module(_PKG + ".ops.base")
    args = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    inp = base.Inputs(tensors={"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
                      args=args)
    ref = type(ops.SPEC).reference(ops.SPEC, inp)
    for name, dst in (("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        for d, s in zip(dst, ref[name]):
            d.copy_(s)
