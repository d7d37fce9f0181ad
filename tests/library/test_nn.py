"""Tuned attention in a nanoGPT-style model: the module, and the patch helper that says what it replaced."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import kerneltune


class NanoAttention(nn.Module):
    """nanoGPT's CausalSelfAttention (model.py), flash path."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h = nn.ModuleList([nn.ModuleDict({"attn": NanoAttention(30, 5), "mlp": nn.Linear(30, 30)})
                                for _ in range(2)])
        self.head = nn.Linear(30, 7)

    def forward(self, x):
        for blk in self.h:
            x = x + blk["attn"](x)
            x = x + blk["mlp"](x)
        return self.head(x)


def test_patch_attention_reports_replaces_and_undoes():
    torch.manual_seed(0)
    model = Model()
    ref = copy.deepcopy(model)
    x = torch.randn(3, 13, 30)
    report = kerneltune.patch_attention(model)
    assert [p.module for p in report] == ["h.0.attn", "h.1.attn"] and all(p.cls == "NanoAttention" for p in report)
    assert "h.0.attn (NanoAttention): forward -> kerneltune.attention" in str(report[0])
    assert kerneltune.patch_attention(model) == report  # idempotent
    y, want = model(x), ref(x)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    want.sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)
    assert kerneltune.served() == {"attention": {"reference": 2}, "attention_backward": {"reference": 2}}
    assert type(model.h[0]["attn"]).forward is NanoAttention.forward  # the class is untouched
    assert kerneltune.unpatch_attention(model) == ["h.0.attn", "h.1.attn"]
    kerneltune.reset_served()
    model(x)
    assert kerneltune.served() == {}


def test_the_module_matches_nanogpt_and_loads_its_state_dict():
    torch.manual_seed(1)
    nano = NanoAttention(24, 3)
    ours = kerneltune.CausalSelfAttention(24, 3)
    ours.load_state_dict(nano.state_dict())  # same parameter names
    x = torch.randn(2, 1, 24), torch.randn(2, 19, 24)
    for xi in x:
        torch.testing.assert_close(ours(xi), nano(xi), atol=1e-5, rtol=1e-5)
    assert kerneltune.served()["attention"] == {"reference": 2}


def test_attention_dropout_in_training_stays_on_torch_and_says_so():
    m = Model()
    for blk in m.h:
        blk["attn"].dropout = 0.1
    report = kerneltune.patch_attention(m)
    assert all("dropout" in p.note for p in report)
    m.train()
    m(torch.randn(2, 5, 30))
    assert kerneltune.served() == {}
    m.eval()
    m(torch.randn(2, 5, 30))
    assert kerneltune.served() == {"attention": {"reference": 2}}


def test_a_patched_model_saved_whole_loads_back_patched_with_the_same_outputs(tmp_path):
    """torch.save(model) of a patched model (the whole module, pickled) loads back, still patched: the same
    outputs as the model saved and as nanoGPT's own SDPA forward, kerneltune.attention serving, unpatchable."""
    torch.manual_seed(2)
    model = Model()
    ref = copy.deepcopy(model)  # unpatched: nanoGPT's forward on SDPA
    kerneltune.patch_attention(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    x = torch.randn(3, 11, 30)
    want, before = ref(x), model(x)
    kerneltune.reset_served()
    got = loaded(x)
    assert kerneltune.served() == {"attention": {"reference": 2}}  # the loaded modules call kerneltune.attention
    torch.testing.assert_close(got, before, atol=0, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    want.sum().backward()
    for (n, p), q in zip(loaded.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)
    # the loaded module's forward is its own (not the saved instance's), and unpatching works on it
    assert loaded.h[0]["attn"].forward.args[0] is loaded.h[0]["attn"]
    assert copy.deepcopy(loaded).h[1]["attn"](x).shape == x.shape
    assert kerneltune.unpatch_attention(loaded) == ["h.0.attn", "h.1.attn"]
    kerneltune.reset_served()
    torch.testing.assert_close(loaded(x), want, atol=1e-5, rtol=1e-5)
    assert kerneltune.served() == {}
