"""The defense as a user runs it: inputs resolved and loaded (``inputs``), the input scale (``scale``), the
curve and its cuts (``curve``, ``ranking_curves``), fine-pruning (``finetune``), results written whole
(``outputs``, ``report``), the whole pipeline (``pipeline.run_defense``) and image screening (``screen``).
"""

from badnet_jax.defense.pipeline import DefenseConfig, run_defense

__all__ = ["DefenseConfig", "run_defense"]
