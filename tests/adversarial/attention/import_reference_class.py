"""Imports kerneltune's attention spec (importlib, concatenated name) and calls the reference
through the class, type(SPEC).reference(SPEC, inputs): a tripwire set only on the SPEC instance does not see
it. The reference is forbidden to candidates whatever the path."""
import math

import torch

KERNELTUNE = {"op": "attention", "backend": "torch"}
# EXPECT: rejected
# REASON: reference

import importlib

_PKG = "kern" + "eltune"


def run(q, k, v, causal=True, scale=None):
    ops = importlib.import_module(_PKG + ".ops.attention")
    base = importlib.import_module(_PKG + ".ops.base")
    inp = base.Inputs(tensors={"q": q, "k": k, "v": v}, args={"causal": causal, "scale": scale})
    return type(ops.SPEC).reference(ops.SPEC, inp)["out"].to(q.dtype)
