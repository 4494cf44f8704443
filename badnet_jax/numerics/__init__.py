"""Numerics of the exact curve: which float32 predictions are near-ties (``ties``), how they are settled
in float64 (``settling``), and how the float64 XLA calls run (``xla64``)."""
