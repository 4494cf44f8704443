"""The pruning sweep: the whole 61-step curve of every data set from one trunk pass, in one jitted call.

Modules, in the order the data flows:

- ``plan``: :class:`SweepOptions` (what a user may ask) resolved once into a :class:`SweepPlan`;
- ``prefix``: the scan of the exact shortcuts (suffix sums, step aliases, alive-channel groups; every step's
  masks and cumulative sums are ``badnet_jax.models.affine``'s);
- ``chunks``: the chunking rule (host and traced);
- ``layout``: which sets share the program's loops (blocks joined along the image axis), and their split;
- ``strategies``: per-set evaluators for each plan strategy, and their work count;
- ``program``: what the one jitted call computes: trunk, ranking, every set at every order; jit / shard_map;
- ``run``: the call on the host: checks, host I/O, settling: :func:`rank_and_sweep`, :func:`compile_sweep`,
  :func:`compile_float64`;
- ``result``: the :class:`Sweep` it returns.
"""

from badnet_jax.models.affine import prefix_masks
from badnet_jax.sweep.plan import PLAIN, SweepOptions, SweepPlan, plan_sweep
from badnet_jax.sweep.program import trunk_features
from badnet_jax.sweep.run import Sweep, compile_float64, compile_sweep, predict_steps, rank_and_sweep
from badnet_jax.sweep.strategies import head_evaluations, shared_evaluations

__all__ = ["PLAIN", "SweepOptions", "SweepPlan", "plan_sweep", "prefix_masks", "Sweep", "compile_sweep",
           "compile_float64", "predict_steps", "rank_and_sweep", "trunk_features", "head_evaluations",
           "shared_evaluations"]
