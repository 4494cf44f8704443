"""The masked head's tail and argmax for many (mask, image) pairs, without writing logits to memory.

Given pre-activations of fc_1 (160) and conv_4 (960) for M masks x N images (see ``badnet_jax.models.affine``),
compute ``argmax(relu(relu(conv4) @ W2 + b2 + fc1) @ Wout + bout)`` for every pair: (M, N) int32.
"""

from badnet_jax.kernels.masked_head.api import head_argmax

__all__ = ["head_argmax"]
