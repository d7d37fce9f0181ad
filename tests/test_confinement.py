"""The confinement probe: the strongest set of layers under which a worker's GPU start-up runs.

No GPU here, so the probes stand in for CUDA's start-up with code that fails under one known layer.
"""

from __future__ import annotations

import pytest

from kerneltune.evaluate.process import Confinement, confinement_for, namespaces_available, probe_confinement
from kerneltune.evaluate.sandbox import landlock_abi

_APPLY = "import json, os, sys; from kerneltune.evaluate import sandbox; sandbox.apply(json.loads(sys.argv[1])); "


def test_every_layer_kept_when_the_probe_runs_under_all():
    conf = probe_confinement(_APPLY + "print('probe-ok')", "test")
    assert conf.note == ""
    assert conf.landlock and conf.nproc
    assert conf.namespaces == namespaces_available()


@pytest.mark.skipif(landlock_abi() == 0, reason="needs Landlock")
def test_only_the_layer_that_breaks_the_probe_is_given_up():
    # writing outside the worker's directory stands in for a driver that Landlock blocks
    code = _APPLY + ("import tempfile; d = tempfile.mkdtemp(dir='/tmp'); os.rmdir(d); print('probe-ok')")
    conf = probe_confinement(code, "test")
    assert not conf.landlock
    assert conf.namespaces == namespaces_available() and conf.nproc
    assert "test failed under stronger confinement" in conf.note and "landlock" in conf.note


@pytest.mark.skipif(not namespaces_available(), reason="needs user namespaces")
def test_namespaces_given_up_when_they_break_the_probe():
    # a one-id user map means a fresh user namespace: stands in for a driver that refuses to start in one
    code = _APPLY + ("assert open('/proc/self/uid_map').read().split()[2] != '1'; print('probe-ok')")
    conf = probe_confinement(code, "test")
    assert not conf.namespaces and conf.landlock
    assert "namespaces" in conf.note


def test_a_probe_that_never_runs_keeps_full_confinement_and_says_so():
    conf = probe_confinement("raise SystemExit(3)", "test")
    assert conf.landlock and conf.nproc
    assert conf.note.startswith("test failed under every confinement tried")


def test_cpu_workers_are_fully_confined_and_sandbox_off_is_explicit():
    assert confinement_for("cpu", True) == Confinement(namespaces_available(), True, True)
    assert confinement_for("cpu", False).note == "sandbox turned off"
