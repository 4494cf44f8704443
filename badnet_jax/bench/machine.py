"""The machine a benchmark runs on: its name, a float32 matmul peak to measure shares against, and a noise check.

Benchmarks report shares of the peak measured in the same run, not absolute rates: the same code ran 40x
the Keras loop on one CPU and 14x on another. :func:`noise_note` says when the run's own peak measurements
disagree too much for its numbers to be trusted.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s "model name", as lscpu's "Model name"), else what the platform
    says, else "unknown CPU"."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model name", "Processor", "cpu model") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_name() -> str:
    """What the benchmark ran on: the CPU model on the CPU backend, else the accelerator's kind and count."""
    devices = jax.devices()
    if jax.default_backend() == "cpu":
        return cpu_model()
    count = f"{len(devices)} x " if len(devices) > 1 else ""
    return f"{count}{devices[0].device_kind}"


def timed(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak_gflops(n: Optional[int] = None, repeats: int = 5) -> float:
    """float32 (HIGHEST precision) n x n x n matmul rate on the default device, GFLOP/s."""
    n = n or (1024 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)).lower(a, b).compile()
    f(a, b).block_until_ready()
    return 2 * n**3 / timed(lambda: f(a, b), repeats) / 1e9


NOISY_PEAK_SPREAD = 0.15
"""A run is flagged as noisy when its matmul peak measurements (before the layers, after them and, for a full
run, at the end) differ by more than this (max / min - 1). On a quiet machine they agree within a few percent;
on a shared one they have been seen 1.5x apart within minutes, and every time and share of the peak moves
with them, so such a run says so rather than report numbers it cannot stand behind."""


def noise_note(peaks_gflops: list[float]) -> Optional[str]:
    """Why a run's numbers are unreliable (its peak measurements too far apart), or None for a steady run."""
    lo, hi = min(peaks_gflops), max(peaks_gflops)
    if hi / lo - 1 <= NOISY_PEAK_SPREAD:
        return None
    return (f"the matmul peak measured {lo:.0f} to {hi:.0f} GFLOP/s in this run ({100 * (hi / lo - 1):.0f}% apart, "
            f"more than {100 * NOISY_PEAK_SPREAD:.0f}%): the machine was busy, so its times and shares of the peak "
            "are unreliable; rerun on a quiet machine")
