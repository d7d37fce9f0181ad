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


# -- reviewed bugs: the file check per source_hash, candidates_root kept by save, the lookup's tie-breaks, the CUDA
# -- device index, a malformed entry, and a speedup that is not a finite positive number
def test_the_file_check_compares_each_entrys_own_hash(tmp_path):
    """Two entries name one file; only one was measured for its source. Whichever is checked first, the other
    keeps its own verdict (the file's hash is what is kept between checks, not one entry's verdict)."""
    src = open(os.path.join(SEEDS, "attention", "numba_cpu.py")).read()
    for order in ("good first", "stale first"):
        folder = tmp_path / order.replace(" ", "_") / "attention"
        folder.mkdir(parents=True)
        (folder / "k.py").write_text(src)
        good = reg.Entry.from_json(entry_for(str(folder / "k.py"), "attention", dims=ATT, args={"causal": True}),
                                   root=str(folder.parent))
        stale = reg.Entry.from_json({**entry_for(str(folder / "k.py"), "attention", dims=ATT, args={"causal": True}),
                                     "source_hash": "0" * 64}, root=str(folder.parent))
        checks = [good, stale] if order == "good first" else [stale, good]
        verdicts = {id(e): reg.check_file(e) for e in checks}
        assert verdicts[id(good)] == "", (order, verdicts)
        assert "changed since it was promoted" in verdicts[id(stale)], (order, verdicts)
        # and asked again (from the kept hash), the same answers
        assert reg.check_file(good) == "" and "changed since it was promoted" in reg.check_file(stale)
        # the stale entry never serves, in either order
        d = reg.Registry([stale]).decide("attention", "cpu", ATT, "float32", {"causal": True})
        assert d.entry is None and "changed since it was promoted" in (d.warning or ""), d


def test_save_keeps_a_declared_candidates_root_and_the_registry_moves_with_its_folder(tmp_path):
    import shutil

    folder = tmp_path / "reg"
    (folder / "kernels" / "attention").mkdir(parents=True)
    shutil.copy(os.path.join(SEEDS, "attention", "numba_cpu.py"), folder / "kernels" / "attention" / "k.py")
    e = entry_for(str(folder / "kernels" / "attention" / "k.py"), "attention", dims=ATT, args={"causal": True})
    e["candidate"] = "attention/k.py"
    path = folder / "registry.json"
    path.write_text(json.dumps({"format": 1, "candidates_root": "kernels", "entries": [e]}))
    r = reg.load(str(path))
    assert r.sources[0].root == str(folder / "kernels") and reg.check_file(r.entries[0]) == ""
    r.save(str(path))  # what `kerneltune promote --registry PATH` does after adding its entries
    doc = json.load(open(path))
    assert doc["candidates_root"] == "kernels" and doc["entries"][0]["candidate"] == "attention/k.py", doc
    moved = tmp_path / "moved"
    shutil.move(str(folder), str(moved))
    back = reg.load(str(moved / "registry.json"))
    assert back.entries[0].path == str(moved / "kernels" / "attention" / "k.py")
    assert reg.check_file(back.entries[0]) == ""
    # a registry without one keeps writing none (candidates/ beside it, the default)
    plain = tmp_path / "plain.json"
    reg.Registry().save(str(plain))
    assert "candidates_root" not in json.load(open(plain))


def _entry_at(dims, *, speedup, name, source=""):
    cand = os.path.join(SEEDS, "attention", "numba_cpu.py")
    return reg.Entry.from_json({**entry_for(cand, "attention", dims=dims, args={"causal": True}, speedup=speedup),
                                "name": name}, root=SEEDS, source=source)


def test_equally_near_buckets_go_to_the_higher_speedup_whatever_the_file_order():
    """docs/library.md, lookup step 4: nearest bucket, then the user registry's entry, then the higher speedup."""
    asked = {"B": 1, "H": 4, "N": 1024, "D": 64}
    slow = _entry_at({"B": 1, "H": 4, "N": 512, "D": 64}, speedup=1.05, name="slow")   # one octave below
    fast = _entry_at({"B": 1, "H": 4, "N": 2048, "D": 64}, speedup=3.0, name="fast")   # one octave above
    for entries in ([slow, fast], [fast, slow]):
        d = reg.Registry(entries).decide("attention", "cpu", asked, "float32", {"causal": True})
        assert d.kind == "nearest" and d.entry.name == "fast", (d.reason, [e.name for e in entries])
    # a nearer bucket comes before a faster one further away (still within reach)
    nearer = _entry_at({"B": 1, "H": 4, "N": 512, "D": 64}, speedup=1.1, name="nearer")      # one octave
    further = _entry_at({"B": 1, "H": 4, "N": 4096, "D": 64}, speedup=3.0, name="further")   # two octaves
    d = reg.Registry([further, nearer]).decide("attention", "cpu", asked, "float32", {"causal": True})
    assert d.entry.name == "nearer", d.reason


def test_a_user_registrys_entry_comes_before_the_shipped_ones_at_the_same_nearness(tmp_path):
    user, shipped = str(tmp_path / "user.json"), str(tmp_path / "shipped.json")
    sources = [reg.Source(path=user, root=SEEDS), reg.Source(path=shipped, root=SEEDS)]
    asked = {"B": 1, "H": 4, "N": 1024, "D": 64}
    mine = _entry_at({"B": 1, "H": 4, "N": 512, "D": 64}, speedup=1.05, name="mine", source=user)
    theirs = _entry_at({"B": 1, "H": 4, "N": 2048, "D": 64}, speedup=3.0, name="theirs", source=shipped)
    for entries in ([theirs, mine], [mine, theirs]):  # the rank is the registry's, not the place in the list
        d = reg.Registry(entries, sources).decide("attention", "cpu", asked, "float32", {"causal": True})
        assert d.kind == "nearest" and d.entry.name == "mine", d.reason
    # in the exact bucket too: the user's entry for the bucket, whatever shape in it each was timed at
    mine = _entry_at({"B": 1, "H": 4, "N": 1000, "D": 64}, speedup=1.05, name="mine", source=user)
    theirs = _entry_at(asked, speedup=3.0, name="theirs", source=shipped)
    d = reg.Registry([theirs, mine], sources).decide("attention", "cpu", asked, "float32", {"causal": True})
    assert d.kind == "exact" and d.entry.name == "mine", d.reason


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two different GPUs (mocked: no CUDA needed): cuda:0 an H100, cuda:1 an A100; the current
    device is cuda:1."""
    from types import SimpleNamespace

    import kerneltune.evaluate.device as dev

    props = {0: SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 << 30,
                                multi_processor_count=132),
             1: SimpleNamespace(name="NVIDIA A100-SXM4-40GB", major=8, minor=0, total_memory=40 << 30,
                                multi_processor_count=108)}

    def get_props(device=None):
        i = getattr(device, "index", device)
        return props[torch.cuda.current_device() if i is None else int(i)]

    def clear():
        for f in vars(dev).values():
            if hasattr(f, "cache_clear"):
                f.cache_clear()

    monkeypatch.setattr(torch.cuda, "get_device_properties", get_props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    clear()
    yield {0: "cuda:nvidia-h100-80gb-hbm3:sm90", 1: "cuda:nvidia-a100-sxm4-40gb:sm80"}
    clear()


def test_the_device_key_of_a_cuda_device_is_its_own_gpus(two_gpus):
    assert reg.device_key(torch.device("cuda", 0)) == two_gpus[0]
    assert reg.device_key(torch.device("cuda", 1)) == two_gpus[1]
    assert reg.device_key("cuda:0") == two_gpus[0] and reg.device_key("cuda:1") == two_gpus[1]
    # no index: the current device (as torch places a tensor created on "cuda")
    assert reg.device_key(torch.device("cuda")) == two_gpus[1] and reg.device_key("cuda") == two_gpus[1]
    # the decision for a call on cuda:1 looks at cuda:1's entries, not GPU 0's
    cand = os.path.join(SEEDS, "attention", "numba_cpu.py")
    h100 = reg.Entry.from_json({**entry_for(cand, "attention", dims=ATT, args={"causal": True}, backend="torch",
                                            device_key=two_gpus[0]), "name": "h100_kernel"}, root=SEEDS)
    r = reg.Registry([h100])
    assert r.decide("attention", torch.device("cuda", 0), ATT, "float32", {"causal": True}).entry is h100
    d = r.decide("attention", torch.device("cuda", 1), ATT, "float32", {"causal": True})
    assert d.entry is None and f"not for this one ({two_gpus[1]})" in d.reason, d.reason
    assert r.servable(("attention",), torch.device("cuda", 1), "float32", {"causal": True}) == []


def test_a_malformed_entry_is_left_out_with_one_warning_and_the_others_serve(user_registry):
    """One bad entry (a missing field) does not take the file's other entries with it: they are as valid as they
    were, and each is checked on its own (its file's hash) before it serves. The bad one is named, once."""
    from tests.library.conftest import TEST_KERNELS

    path = user_registry([(os.path.join(TEST_KERNELS, "attention", "torch_lse.py"),
                           dict(op="attention", dims=ATT, args={"causal": True}, backend="torch"))])
    doc = json.load(open(path))
    doc["entries"].append({"op": "attention", "device_key": reg.device_key("cpu")})  # the rest went missing
    open(path, "w").write(json.dumps(doc))
    serve.reload()
    msgs = calls_warnings()
    assert len(msgs) == 1 and path in msgs[0] and "entries[1]" in msgs[0] and "missing field" in msgs[0], msgs
    assert kerneltune.served() == {"attention": {"torch_lse": 3}}
    entries, src = reg.read_file(path)
    assert [e.name for e in entries] == ["torch_lse"] and src.entries == 1 and "entries[1]" in src.error
    assert [x["index"] for x in src.rejected] == [1] and src.rejected[0]["device_key"] == reg.device_key("cpu")


@pytest.mark.parametrize("speedup", [float("nan"), float("inf"), 0.0, -1.5, "fast", None],
                         ids=["nan", "inf", "zero", "negative", "text", "null"])
def test_an_entry_whose_speedup_is_not_a_finite_positive_number_is_rejected(tmp_path, monkeypatch, speedup):
    """A NaN speedup compares False with everything, so the regression gate (recorded > CI end) could never fire
    for it; an infinite one would outrank every other entry. Such an entry is refused when read."""
    cand = os.path.join(SEEDS, "attention", "numba_cpu.py")
    good = entry_for(cand, "attention", dims=ATT, args={"causal": True})
    bad = {**good, "speedup": speedup, "bucket": "D64 N256 BH8", "dims": {"B": 2, "H": 4, "N": 256, "D": 64}}
    with pytest.raises(reg.RegistryError, match=r"entries\[1\].*speedup"):
        reg.Entry.from_json(bad, where="r.json: entries[1]")
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"format": 1, "candidates_root": SEEDS, "entries": [good, bad]}))
    entries, src = reg.read_file(str(path))
    assert len(entries) == 1 and entries[0].speedup == 1.5
    assert str(path) in src.error and "entries[1]" in src.error and "speedup" in src.error, src.error
    monkeypatch.setenv(reg.ENV_MIN_SPEEDUP, "0")  # even serving any kernel that passed, it never serves
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = reg.load(str(path))
    d = r.decide("attention", "cpu", {"B": 2, "H": 4, "N": 256, "D": 64}, "float32", {"causal": True})
    assert d.entry is None or d.entry.speedup == 1.5, d.reason
