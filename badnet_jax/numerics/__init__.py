"""Numerics of the exact curve: which float32 predictions are near-ties (``ties``) and how they are settled
in float64 (``settling``)."""
