"""2-D convolution (NHWC x HWIO) for the models' trunks, fast on a CPU where XLA's own is weak.

XLA's CPU convolution is weak on some shapes: with few input channels, which every CNN's first layer has (3
colours; the lab DeepID's conv_1, 3 -> 20 4x4, ran at ~20% of the machine's matmul peak), and with output
channels that leave a remainder of its vectors (DeepID's conv_3, 40 -> 60). ``direct`` is a native XLA:CPU
kernel (C++ through XLA's FFI, built on first use by ``native.py``) vectorised over the output channels;
where it cannot be built, folding blocks of output columns into the channel axis ("width-blocked") turns a
few-channel convolution into one XLA runs well. Which form runs is a fixed rule per shape (see ``api.py``).
"""

from badnet_jax.kernels.conv2d.api import conv2d, direct_fits, native_lanes, resolve_impl
from badnet_jax.kernels.conv2d.direct import conv2d_direct
from badnet_jax.kernels.conv2d.reference import conv2d_reference
from badnet_jax.kernels.conv2d.width_blocked import conv2d_width_blocked

__all__ = ["conv2d", "conv2d_direct", "conv2d_reference", "conv2d_width_blocked", "direct_fits", "native_lanes",
           "resolve_impl"]
