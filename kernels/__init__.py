"""Custom kernels for badnet-jax: each op has a pure-JAX reference (the default), Pallas kernels, and an api.py."""
