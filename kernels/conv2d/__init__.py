"""2-D convolution (NHWC x HWIO) for the models' trunks, fast when the input has few channels.

XLA's CPU convolution is weak on some shapes with few input channels, which every CNN's first layer has (3
colours): the lab DeepID's conv_1 (3 -> 20, 4x4) runs at ~4% of the machine's matmul peak. Folding blocks of
output columns into the channel axis ("width-blocked") turns it into a convolution XLA runs well. Which form is
faster depends on the shape: ``conv2d`` picks by a fixed rule measured on a CPU (see ``api.py``).
"""

from badnet_jax.kernels.conv2d.api import conv2d, resolve_block
from badnet_jax.kernels.conv2d.reference import conv2d_reference
from badnet_jax.kernels.conv2d.width_blocked import conv2d_width_blocked

__all__ = ["conv2d", "conv2d_reference", "conv2d_width_blocked", "resolve_block"]
