"""The GPT against an independent float64 computation written from the GPT-2 equations, its size and
FLOP count against hand arithmetic, and the tuned attention inside the model against the reference."""

from __future__ import annotations

import math

import pytest
import torch

from kerneltune.train.model import GPT, GPTConfig
from kerneltune.train.presets import PRESETS


def _layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _gelu(x):  # exact (erf) GELU, as nn.GELU()
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def independent_logits(sd: dict, cfg: GPTConfig, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2 forward from the state dict alone, in float64, with an explicit causal softmax per head."""
    w = {k: v.double() for k, v in sd.items()}
    B, T = idx.shape
    C, nh = cfg.n_embd, cfg.n_head
    hs = C // nh
    x = w["transformer.wte.weight"][idx] + w["transformer.wpe.weight"][:T]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        h = _layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        qkv = h @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
        heads = []
        for j in range(nh):
            q = qkv[..., j * hs:(j + 1) * hs]
            k = qkv[..., C + j * hs:C + (j + 1) * hs]
            v = qkv[..., 2 * C + j * hs:2 * C + (j + 1) * hs]
            s = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
            s = s.masked_fill(~mask, float("-inf"))
            heads.append(torch.softmax(s, -1) @ v)
        y = torch.cat(heads, -1) @ w[p + "attn.c_proj.weight"].T + w[p + "attn.c_proj.bias"]
        x = x + y
        h = _layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        h = _gelu(h @ w[p + "mlp.c_fc.weight"].T + w[p + "mlp.c_fc.bias"])
        x = x + h @ w[p + "mlp.c_proj.weight"].T + w[p + "mlp.c_proj.bias"]
    x = _layer_norm(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"])
    return x @ w["transformer.wte.weight"].T  # tied output embedding


@pytest.mark.parametrize("T", [1, 7, 16])
def test_forward_matches_independent_float64(T):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=61, n_layer=2, n_head=3, n_embd=24)
    model = GPT(cfg).eval()
    with torch.no_grad():  # move LayerNorms and biases off their init so they are tested too
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    idx = torch.randint(0, cfg.vocab_size, (3, T))
    targets = torch.randint(0, cfg.vocab_size, (3, T))
    logits, loss = model(idx, targets)
    ref = independent_logits(model.state_dict(), cfg, idx)
    torch.testing.assert_close(logits.double(), ref, rtol=1e-4, atol=1e-5)
    ref_loss = -torch.log_softmax(ref, -1).gather(-1, targets[..., None]).mean()
    assert abs(loss.item() - ref_loss.item()) < 1e-5


def test_gpt2_124m_size_and_flops():
    cfg = PRESETS["gpt2-124m"].model
    C, L, V, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.block_size
    per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    expected = L * per_block + V * C + 2 * C  # blocks, tied token embedding, final LayerNorm (no wpe)
    with torch.device("meta"):  # shapes only: no 124M random numbers drawn
        model = GPT(cfg)
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + T * C
    assert 123e6 < model.num_params(non_embedding=False) < 125e6  # GPT-2 small, vocab padded to 50304
    assert model.flops_per_token() == 6 * expected + 12 * L * C * T  # nh · hs = C


def test_weight_decay_groups_cover_every_parameter_once():
    model = GPT(PRESETS["smoke"].model)
    groups = model.optimizer_groups(0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])


def test_tuned_attention_in_the_model_matches_reference():
    kernels = pytest.importorskip("kerneltune.train.kernels")
    try:
        tuned = kernels.tuned("cpu")
    except kernels.KernelsUnavailable as e:
        pytest.skip(str(e))
    cfg = PRESETS["smoke"].model
    torch.manual_seed(0)
    ref_model = GPT(cfg)
    tuned_model = GPT(cfg, tuned.attend)
    tuned_model.load_state_dict(ref_model.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    tuned.reset()
    _, l_ref = ref_model(idx, idx)
    _, l_tun = tuned_model(idx, idx)
    l_ref.backward()
    l_tun.backward()
    assert abs(l_ref.item() - l_tun.item()) < 1e-5
    for (n, a), b in zip(ref_model.named_parameters(), tuned_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert sum(tuned.served().get("attention", {}).values()) == cfg.n_layer  # every layer asked the registry
