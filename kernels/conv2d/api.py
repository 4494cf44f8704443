"""Dispatch for the 2-D convolution: XLA's reference, the native direct kernel, or the width-blocked form.

``impl``: ``"auto"`` (the default), ``"reference"``, ``"direct"`` (:func:`conv2d_direct`, a native XLA:CPU
kernel), or an int block size B for :func:`conv2d_width_blocked`.

``"auto"`` is a fixed rule (so the same model computes the same bits in every run on a machine), decided per
platform when the program is lowered (``lax.platform_dependent``: a program exported for a GPU on a CPU host
holds XLA's convolution). Every other platform runs XLA's convolution. On a CPU, float32:

- **direct** where the native kernel is built (``badnet_jax.kernels.native.native_library``; the default backend is the CPU) and
  either the input has fewer than :data:`FEW_CHANNELS` channels into fewer than :data:`WIDE_OUTPUT` output
  channels (every RGB first layer: XLA:CPU's weak case), or the output channels are not a whole number of the
  kernel's vectors but fill at least :data:`FULL_LANES` of them (F = 40, 60 with 16 lanes: XLA:CPU handles the
  remainder channels slowly, the direct kernel pays only its zero lanes). Measured on a 2-core Xeon (AVX-512,
  512 images, 3x3 kernels, outputs 6x6 to 24x24, C in 3/16/40/64, F in 20/32/60/64/128; docs/benchmarks.md):
  direct was 1.31-3.6x faster than XLA's at F = 60, 1.42-1.44x at C = 3, F = 20, 0.99-1.08x at C = 3,
  F = 32; XLA's was faster or equal at F = 20 from 16 channels on (0.59-1.01x) and at F = 64, 128 (mixed,
  0.58-2.1x), which the rule leaves to it. DeepID: conv_1 1.46x, conv_3 1.66x, conv_2 equal.
  Also **direct** where input and output channels are both at most :data:`NARROW` (16: a ResNet's 16-channel
  stages), where XLA:CPU's convolution has too narrow a matrix product to run well, whatever the kernel's
  lanes. Measured on a 2-core AMD EPYC Zen 4 (16 lanes; 1024 images, min of 7 alternating;
  docs/benchmarks.md): direct 1.33-2.4x faster with 3x3 kernels from 8 or 16 channels into 8 or 16 ('same' or
  'valid', stride 1 or 2, 16x16 and 32x32 inputs), 1.0-1.16x for a 1x1; about equal from 32 input channels
  (0.93-1.05x), and XLA's faster for a 5x5 from 32 (0.63x), which the rule leaves to XLA; resnet_tiny's trunk
  1.3x faster. On a 2-core Zen 3 (AVX2, 8 lanes; min of 11): 2.0-3.75x from 4 or 8 channels into 8, 1.45-2.2x
  with 16 channels in or out (two vectors there). On a 2-core Intel Xeon (16 lanes; min of 11, two runs):
  1.4-3.9x from 4, 8 or 16 channels into 8 or 16 (3x3, 'same' or 'valid', 16x16 and 32x32), 1.0x for a 1x1;
  XLA's 1.02-1.10x faster outside the rule (32 channels in; a 5x5 from 32; unpooled F = 20 from 16 channels).
  Also **direct** for a stage with a max pool (``pool``) into at most :data:`POOLED_OUTPUT` channels, whatever
  its input: the kernel's fused pool spares XLA's separate pass over the convolution's output. Measured with
  16 lanes (3x3 kernels, 16 and 64 input channels, 10 and 30 output columns, ReLU and 2x2 pool, 256 images;
  docs/benchmarks.md): direct 1.15-3.27x faster at F = 16 to 40, 1.0-1.24x at F = 48, 0.94-1.19x at 64,
  0.85-1.02x from 80 on.
- else **width-blocked** with an input of fewer than :data:`FEW_CHANNELS` channels into fewer than
  :data:`WIDE_OUTPUT` output channels, with the B in (2, 4) of the lower modelled cost
  ``reach * B / kw * WIDE_OUTPUT / min(B * F, WIDE_OUTPUT)`` (the multiply-adds per useful one, over XLA's
  efficiency on B * F output channels, taken as proportional up to WIDE_OUTPUT; ties to B = 2): the best XLA
  form where no native kernel could be built. The model reproduces which form was faster in every narrow
  case measured on 64 images on a 2-core Xeon (ms, XLA's / B=2 / B=4; docs/benchmarks.md): 55x47x3 -> 20 4x4
  (DeepID's conv_1) 45.1 / 5.7 / 4.4; 32x32x3 -> 16 3x3 'same' 3.2 / 0.66 / 0.90; -> 32 4.1 / 1.0 / 1.7;
  -> 6 5x5 3.5 / 1.6 / 0.87; 28x28x1 -> 32 3x3 0.45 / 0.41 / 0.64. XLA's own was the fastest at 64 and 128
  output channels (3x3: 1.5 / 1.9 / 3.6 and 2.9 / 3.5 / 7.0) and with 4 input channels (55x47x4 -> 20 4x4,
  1024 images: 158 / 115 / 114 GFLOP/s).
- else XLA's own convolution.

Every form computes the same products; only the order of the sums differs (what the near-tie bounds and the
float64 settling are there for).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from badnet_jax.kernels.conv2d.direct import conv2d_direct
from badnet_jax.kernels.native import native_library
from badnet_jax.kernels.conv2d.reference import Padding, conv2d_reference, epilogue
from badnet_jax.kernels.conv2d.width_blocked import block_geometry, conv2d_width_blocked, explicit_pads

Impl = Union[str, int]
# Inputs with fewer channels (every RGB first layer) are XLA:CPU's weak case; direct_cpu.cc's FEW_INPUT_CHANNELS
# names the same case for its own choice of layout.
FEW_CHANNELS = 4
WIDE_OUTPUT = 64  # output channels from which XLA:CPU's own convolution runs well
FULL_LANES = Fraction(3, 4)  # the share of its vector lanes the direct kernel must fill beyond a remainder
POOLED_OUTPUT = 64  # output channels up to which a stage with a max pool runs direct (its fused epilogue)
NARROW = 16  # input and output channels up to which every convolution runs direct (XLA's narrow matrix product)
NATIVE = "native"  # ``lanes=NATIVE``: the vector width of the native kernel built here (None where none is)


def native_lanes() -> Optional[int]:
    """The native direct kernel's vector width where it runs here (the CPU is the default backend and the native
    kernels are built: ``badnet_jax.kernels.native.native_library``), else None (then no CPU convolution runs
    direct under ``"auto"``)."""
    if jax.default_backend() != "cpu":
        return None  # a CPU branch lowered on an accelerator host runs XLA's forms; nothing is built there
    kernel = native_library()
    return None if kernel is None else kernel.lanes


def _few_channels(c: int, f: int) -> bool:
    # XLA:CPU's weak case: few input channels (an RGB first layer) into a narrow output.
    return c < FEW_CHANNELS and f < WIDE_OUTPUT


def direct_fits(kernel_shape: Sequence[int], lanes: int, pooled: bool = False) -> bool:
    """Whether the rule runs a (kh, kw, C, F) float32 convolution by the direct kernel of ``lanes``-wide vectors
    (``pooled``: a max pool follows it, fused into the kernel)."""
    _, _, c, f = (int(d) for d in kernel_shape)
    if _few_channels(c, f) or (pooled and f <= POOLED_OUTPUT) or (c <= NARROW and f <= NARROW):
        return True
    padded = -(-f // lanes) * lanes
    return f % lanes != 0 and Fraction(f, padded) >= FULL_LANES


def _cost(block: int, kw: int, f: int, stride: int, dilation: int) -> Fraction:
    reach = ((block - 1) * stride + (kw - 1) * dilation) // (block * stride) + 1
    return Fraction(reach * block * stride, kw) * Fraction(WIDE_OUTPUT, min(block * f, WIDE_OUTPUT))


def resolve_impl(kernel_shape: Sequence[int], strides: Sequence[int] = (1, 1), dilation: Sequence[int] = (1, 1),
                 impl: Impl = "auto", platform: Optional[str] = None, dtype: Any = jnp.float32,
                 lanes: Union[Optional[int], str] = NATIVE, pooled: bool = False) -> Impl:
    """What ``impl`` means for a convolution with this (kh, kw, C, F) kernel: ``"reference"`` (XLA's own),
    ``"direct"`` or a width-blocked block size >= 2.

    Args:
        kernel_shape: the kernel's (kh, kw, C, F).
        strides, dilation: the convolution's (the width's enter the blocked form's cost model).
        impl: ``"auto"`` (the rule in the module docstring), ``"reference"``, ``"direct"`` or a block size >= 1
            (1: the reference).
        platform: the platform it runs on (None: the default backend's).
        dtype: the images' dtype (the direct kernel is float32's).
        lanes: the direct kernel's vector width (``NATIVE``: the kernel built here, :func:`native_lanes`; None:
            no direct kernel), for the ``"auto"`` rule.
        pooled: whether a max pool follows the convolution (its epilogue), for the ``"auto"`` rule.

    Raises:
        ValueError: an ``impl`` other than these, or ``"direct"`` for another dtype than float32.
    """
    if impl == "reference":
        return "reference"
    if impl == "direct":
        if jnp.dtype(dtype) != jnp.float32:
            raise ValueError(f"impl='direct' computes float32 convolutions, got {jnp.dtype(dtype).name} images")
        return "direct"
    if isinstance(impl, (int, np.integer)) and not isinstance(impl, bool) and impl >= 1:
        return "reference" if impl == 1 else int(impl)
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'reference', 'direct' or a positive block size, got {impl!r}")
    _, kw, c, f = (int(d) for d in kernel_shape)
    if (platform or jax.default_backend()) != "cpu":
        return "reference"
    if jnp.dtype(dtype) == jnp.float32:
        lanes = native_lanes() if lanes == NATIVE else lanes
        if lanes is not None and direct_fits(kernel_shape, lanes, pooled):
            return "direct"
    if not _few_channels(c, f):
        return "reference"
    return min((2, 4), key=lambda b: (_cost(b, kw, f, int(strides[1]), int(dilation[1])), b))


def conv2d(x_NxHxWxC: jax.Array, kernel_HxWxIxO: jax.Array, strides: Sequence[int] = (1, 1),
           padding: Padding = "VALID", dilation: Sequence[int] = (1, 1),
           precision: Any = jax.lax.Precision.HIGHEST, impl: Impl = "auto",
           bias: Optional[jax.Array] = None, relu: bool = False,
           pool: Optional[Sequence[int]] = None) -> jax.Array:
    """An NHWC x HWIO convolution in the form :func:`resolve_impl` picks, with its epilogue; traceable.

    Args:
        x_NxHxWxC: images.
        kernel_HxWxIxO: the kernel (kh, kw, C, F), same dtype as the images.
        strides, padding, dilation, precision: as ``lax.conv_general_dilated`` (padding ``"VALID"``, ``"SAME"``
            or explicit ((top, bottom), (left, right))). The direct kernel computes in float32 whatever the
            precision (XLA:CPU's own does too).
        impl: ``"auto"`` (chosen per platform at lowering), ``"reference"``, ``"direct"`` or a block size.
        bias: (F,) added to every output (None: none); given here, it is added where it is cheapest.
        relu, pool: an epilogue (``reference.epilogue``): the max over (ph, pw) windows (stride = window,
            VALID; None: none), then ``max(., 0)`` if ``relu``; the direct kernel fuses it (the convolution's
            output never goes to memory), the other forms run it after the convolution. A CNN's
            conv -> relu -> max pool stage in one call, the same values as the three ops.

    Returns:
        (N, Ho // ph, Wo // pw, F) outputs.

    Raises:
        ValueError: an unknown ``impl``; ``"direct"`` on other images than float32 or where the native kernel
            could not be built.
    """
    strides, dilation = tuple(strides), tuple(dilation)

    def reference(x, k, b):
        out = conv2d_reference(x, k, strides, padding, dilation, precision)
        return epilogue(out if b is None else out + b.astype(out.dtype)[None, None, None, :], relu, pool)

    def blocked(block):
        return lambda x, k, b: epilogue(conv2d_width_blocked(x, k, block, strides, padding, dilation, precision, b),
                                        relu, pool)

    def direct(x, k, b):
        return conv2d_direct(x, k, strides, padding, dilation, b, relu, pool)

    pooled = pool is not None and tuple(pool) != (1, 1)
    choice = resolve_impl(kernel_HxWxIxO.shape, strides, dilation, impl, platform="cpu" if impl == "auto" else None,
                          dtype=x_NxHxWxC.dtype, pooled=pooled)
    kh, kw = kernel_HxWxIxO.shape[:2]
    pads = [explicit_pads(x_NxHxWxC.shape[1 + a], (kh, kw)[a], strides[a], dilation[a], padding, a) for a in (0, 1)]
    if choice != "reference" and min(pads[0] + pads[1]) < 0:
        choice = "reference"  # negative padding crops: the other forms have nothing to gain
    if isinstance(choice, int) and block_geometry(x_NxHxWxC.shape[2] + sum(pads[1]), kw, choice, strides[1],
                                                  dilation[1])[0] <= 0:
        choice = "reference"  # no output column: the blocked layout has nothing to gain
    if choice == "reference":
        return reference(x_NxHxWxC, kernel_HxWxIxO, bias)
    form = direct if choice == "direct" else blocked(choice)
    if impl != "auto":
        return form(x_NxHxWxC, kernel_HxWxIxO, bias)
    # The rule is a CPU's: lowered for any other platform, the program holds XLA's own convolution.
    return jax.lax.platform_dependent(x_NxHxWxC, kernel_HxWxIxO, bias, cpu=form, default=reference)
