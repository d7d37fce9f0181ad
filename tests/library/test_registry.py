"""The registry: buckets, the lookup order, the serving policy, and every way a registry can be wrong (another
device, a missing or changed candidate file, a corrupt file) leading to the reference with one warning."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import kerneltune
import kerneltune.registry as reg
from kerneltune.library import serve
from tests.library.conftest import SEEDS, entry_for, kt_warnings

ATT = {"B": 2, "H": 4, "N": 100, "D": 64}


def q_k_v(b=2, h=4, n=100, d=64):
    return [torch.randn(b, h, n, d) for _ in range(3)]


def calls_warnings(n: int = 3, **shape) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            q, k, v = q_k_v(**shape)
            torch.testing.assert_close(kerneltune.attention(q, k, v),
                                       torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    return kt_warnings(caught)


def test_buckets_and_distance():
    assert reg.bucket("attention", ATT) == "D64 N128 BH8"
    assert reg.bucket("attention", {"B": 1, "H": 1, "N": 1, "D": 8}) == "D8 N1 BH1"
    assert reg.bucket("adamw", {"shapes": [[3, 4], [5]]}) == "P32"
    assert reg.norm_dims("adamw", {"shapes": [[3, 4], [5]]}) == {"numel": 17, "tensors": 2}
    near = {"B": 2, "H": 4, "N": 256, "D": 64}
    far = {"B": 2, "H": 4, "N": 100, "D": 128}  # another head dim counts double
    assert reg.distance("attention", ATT, ATT) == 0
    assert reg.distance("attention", ATT, near) < reg.distance("attention", ATT, far)


def test_lookup_exact_then_nearest_then_reference(tmp_path):
    cand = os.path.join(SEEDS, "attention", "numba_cpu.py")
    mk = lambda dims, **kw: reg.Entry.from_json(entry_for(cand, "attention", dims=dims, args={"causal": True}, **kw),
                                                root=SEEDS)
    small, big = mk({"B": 1, "H": 1, "N": 32, "D": 64}), mk({"B": 8, "H": 16, "N": 2048, "D": 64}, speedup=3.0)
    r = reg.Registry([small, big])
    e, why = r.lookup("attention", "cpu", {"B": 1, "H": 1, "N": 30, "D": 64}, "float32", {"causal": True})
    assert e is small and why.startswith("exact")
    e, why = r.lookup("attention", "cpu", {"B": 8, "H": 16, "N": 1500, "D": 64}, "float32", {"causal": True})
    assert e is big and why.startswith("exact")
    e, why = r.lookup("attention", "cpu", {"B": 8, "H": 8, "N": 1024, "D": 64}, "float32", {"causal": True})
    assert e is big and why.startswith("nearest bucket")
    # beyond reach: three octaves from the nearest entry, or another head dim: the reference, and why
    for far in ({"B": 4, "H": 8, "N": 1024, "D": 64}, {"B": 8, "H": 16, "N": 2048, "D": 128}):
        e, why = r.lookup("attention", "cpu", far, "float32", {"causal": True})
        assert e is None and "too far from" in why and "within 2 octaves of N and B*H at the same head dim" in why, why
    for dtype, args in (("float16", {"causal": True}), ("float32", {"causal": False})):
        e, why = r.lookup("attention", "cpu", ATT, dtype, args)
        assert e is None and why.startswith("no attention entry"), why
    e, why = r.lookup("adamw", "cpu", {"shapes": [[3]]}, "float32", {})
    assert e is None and "no registry entry for adamw" in why
    # the serving policy: below the minimum speedup, never; the minimum comes from the environment
    slow = reg.Registry([mk(ATT, speedup=0.5)])
    d = slow.decide("attention", "cpu", ATT, "float32", {"causal": True})
    assert d.entry is None and "below the minimum 1" in d.reason and d.warning is None
    assert slow.decide("attention", "cpu", ATT, "float32", {"causal": True}, minimum=0.1).entry is not None


def test_a_user_registry_comes_before_the_shipped_one(tmp_path, monkeypatch, user_registry):
    cand = os.path.join(SEEDS, "attention", "numba_cpu.py")
    shipped = tmp_path / "shipped.json"
    e = entry_for(cand, "attention", dims=ATT, args={"causal": True}, speedup=5.0)
    e["candidate"] = cand
    e["name"] = "shipped_kernel"
    shipped.write_text(json.dumps({"format": 1, "entries": [e]}))
    monkeypatch.setattr(reg, "shipped_path", lambda: str(shipped))
    user_registry([("attention/numba_cpu.py", dict(op="attention", dims=ATT, args={"causal": True}, speedup=1.2))])
    r = reg.load()
    assert [s.path for s in r.sources] == [os.environ[reg.ENV_REGISTRY], str(shipped)]
    entry, why = r.lookup("attention", "cpu", ATT, "float32", {"causal": True})
    assert entry.name == "numba_cpu" and entry.source == os.environ[reg.ENV_REGISTRY]


def test_an_entry_for_another_device_gives_the_reference_and_one_warning(user_registry):
    user_registry([("attention/numba_cpu.py", dict(op="attention", dims=ATT, args={"causal": True},
                                                   device_key="cuda:nvidia-h100-80gb-hbm3:sm90", backend="triton"))])
    msgs = calls_warnings()
    assert len(msgs) == 1 and "only for other devices (cuda:nvidia-h100-80gb-hbm3:sm90)" in msgs[0], msgs
    assert kerneltune.served() == {"attention": {"reference": 3}}


def test_the_shipped_registry_holding_other_devices_does_not_warn(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped.json"
    e = entry_for(os.path.join(SEEDS, "attention", "numba_cpu.py"), "attention", dims=ATT, args={"causal": True},
                  device_key="cpu:some-other-cpu:64t")
    e["candidate"] = os.path.join(SEEDS, "attention", "numba_cpu.py")
    shipped.write_text(json.dumps({"format": 1, "entries": [e]}))
    monkeypatch.setattr(reg, "shipped_path", lambda: str(shipped))
    serve.reload()
    assert calls_warnings() == []
    assert "only for other devices (cpu:some-other-cpu:64t)" in kerneltune.decisions()[0]["reason"]


def test_a_missing_candidate_file_gives_the_reference_and_one_warning(user_registry):
    path = user_registry([("attention/numba_cpu.py", dict(op="attention", dims=ATT, args={"causal": True}))])
    os.remove(os.path.join(os.path.dirname(path), "candidates", "attention", "numba_cpu.py"))
    msgs = calls_warnings()
    assert len(msgs) == 1 and "is missing" in msgs[0], msgs
    assert kerneltune.served() == {"attention": {"reference": 3}}


def test_a_changed_candidate_file_never_serves(user_registry, monkeypatch):
    path = user_registry([("attention/numba_cpu.py", dict(op="attention", dims=ATT, args={"causal": True}))])
    cand = os.path.join(os.path.dirname(path), "candidates", "attention", "numba_cpu.py")
    with open(cand, "a") as f:
        f.write("\n# an edit after promotion\n")
    msgs = calls_warnings()
    assert len(msgs) == 1 and "changed since it was promoted" in msgs[0], msgs
    assert kerneltune.served() == {"attention": {"reference": 3}}


@pytest.mark.parametrize("content", ["{not json", '{"entries": 3}', '{"format": 99, "entries": []}',
                                     '{"format": 1, "entries": [{"op": "attention"}]}', None],
                         ids=["syntax", "entries-not-list", "future-format", "entry-missing-fields", "no-such-file"])
def test_a_corrupt_registry_gives_the_reference_and_one_warning(tmp_path, monkeypatch, content):
    bad = tmp_path / "corrupt.json"
    if content is not None:
        bad.write_text(content)
    monkeypatch.setenv(reg.ENV_REGISTRY, str(bad))
    serve.reload()
    msgs = calls_warnings()
    assert len(msgs) == 1 and str(bad) in msgs[0], msgs
    assert kerneltune.served() == {"attention": {"reference": 3}}


def test_a_kernel_that_fails_to_import_gives_the_reference_and_one_warning(user_registry, monkeypatch):
    path = user_registry([("attention/numba_cpu.py", dict(op="attention", dims=ATT, args={"causal": True}))])
    doc = json.load(open(path))
    cand = os.path.join(os.path.dirname(path), "candidates", doc["entries"][0]["candidate"])
    src = open(cand).read() + "\nraise RuntimeError('broken at import')\n"
    open(cand, "w").write(src)
    doc["entries"][0]["source_hash"] = reg.file_hash(src)
    open(path, "w").write(json.dumps(doc))
    serve.reload()
    msgs = calls_warnings()
    assert len(msgs) == 1 and "failed to load" in msgs[0] and "broken at import" in msgs[0], msgs


def test_save_and_load_round_trip_with_relative_candidates(tmp_path):
    cand_dir = tmp_path / "candidates" / "attention"
    cand_dir.mkdir(parents=True)
    src = open(os.path.join(SEEDS, "attention", "numba_cpu.py")).read()
    (cand_dir / "k.py").write_text(src)
    e = reg.Entry.from_json(entry_for(str(cand_dir / "k.py"), "attention", dims=ATT, args={"causal": True}),
                            root=str(tmp_path / "candidates"))
    r = reg.Registry()
    assert r.add(e) is None
    assert r.add(e) is e  # same key: replaced
    r.save(str(tmp_path / "registry.json"))
    doc = json.load(open(tmp_path / "registry.json"))
    assert doc["format"] == 1 and doc["entries"][0]["candidate"] == "attention/k.py"
    back = reg.load(str(tmp_path / "registry.json"))
    assert back.entries == [e] and back.entries[0].path == str(cand_dir / "k.py")
    assert reg.check_file(back.entries[0]) == ""
    assert back.for_device(reg.device_key("cpu")) == back.entries and back.for_device("cuda:x:sm90") == []


def test_the_shipped_registry_is_consistent(monkeypatch):
    """Every shipped entry names a shipped candidate file that hashes to what passed, on the device kind its
    backend runs on, with a measured speedup and provenance."""
    monkeypatch.undo()  # the real shipped path
    path = reg.shipped_path()
    entries, src = reg.read_file(path)
    assert src.error == "" and os.path.isdir(src.root)
    for e in entries:
        assert reg.check_file(e) == "", e.describe()
        assert e.bucket == reg.bucket(e.op, e.dims)
        assert e.device_key.split(":")[0] in ("cpu", "cuda") and reg._runs_on(e.backend, e.device_key.split(":")[0])
        assert e.speedup > 0 and e.median_ms and e.versions.get("torch") and e.provenance.get("evaluation")
