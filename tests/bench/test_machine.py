"""badnet_jax.bench.machine: the machine is named by its CPU model, as lscpu names it."""

from __future__ import annotations

import shutil

from badnet_jax import bench


def test_the_machine_is_named_by_its_cpu_model_on_a_cpu(monkeypatch):
    import subprocess

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout if shutil.which("lscpu") \
        else ""
    named = [line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name:")]
    if named:
        assert bench.cpu_model() == " ".join(named[0].split())
    assert bench.cpu_model()
    assert bench.machine_name() == bench.cpu_model()  # the tests run on the CPU backend
