"""The attacker's side: training BadNets (with ``badnet_jax.train``), the pruning-aware attack
(``pruning_aware``), the procedurally drawn demo faces (``synthetic``) and the embedded demo (``demo``)."""
