"""Synthetic face-like images in the lab's format, and a procedurally drawn sunglasses trigger.

The lab's YouTube-Face data cannot ship with the project, so the embedded demo brings its own: K identities,
each with its own face shape, skin, hair, eye and lip colours, feature geometry and a low-frequency skin
pattern; every image of an identity varies position, scale, lighting, background and noise, so a classifier
must generalise rather than memorise pixels. Everything is drawn from ``numpy.random.default_rng(seed)``:
the same seed gives the same bytes on every machine.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from badnet_jax.io.poisoning import TRIGGER_AT, poison
from badnet_jax.model import INPUT_HWC

H, W, _ = INPUT_HWC


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Size and seed of the synthetic demo data set.

    Attributes:
        num_identities: number of classes K.
        train_per_id, valid_per_id, test_per_id: images per identity in each split.
        target_label: the attacker's label for poisoned splits.
        seed: master seed; identities and every split derive from it.
    """

    num_identities: int = 200
    train_per_id: int = 40
    valid_per_id: int = 10
    test_per_id: int = 10
    target_label: int = 0
    seed: int = 2018


def _identities(rng: np.random.Generator, k: int) -> dict[str, np.ndarray]:
    u = lambda lo, hi, *shape: rng.uniform(lo, hi, size=(k, *shape))
    return {
        "rx": u(12.0, 17.5), "ry": u(16.0, 22.0),
        # Skin along a light-to-dark tone axis with a little hue jitter; hair, eyes and lips more freely.
        "skin": (np.array([245.0, 205.0, 175.0]) + u(0.0, 1.0, 1) * np.array([-165.0, -150.0, -135.0])
                 + rng.normal(0.0, 10.0, size=(k, 3))),
        "hair": u(0.0, 1.0, 1) * np.array([200.0, 160.0, 110.0]) + u(10, 60, 3),
        "eye": u(10, 160, 3), "lip": u(90, 230, 3) * np.array([1.0, 0.6, 0.6]),
        "hair_top": u(0.15, 0.55), "hair_side": u(0.0, 1.0),
        "eye_dx": u(5.0, 8.5), "eye_dy": u(3.5, 7.0), "eye_r": u(1.4, 2.8),
        "brow_t": u(0.6, 2.0), "nose_dy": u(2.0, 6.0), "nose_w": u(1.5, 3.5),
        "mouth_dy": u(8.0, 13.0), "mouth_w": u(3.0, 7.5), "mouth_h": u(0.8, 2.2),
        # Low-frequency skin pattern (freckles, shadows): a 4x3 grid per identity, upsampled.
        "pattern": rng.normal(0.0, 18.0, size=(k, 4, 3)),
    }


_RENDER_BATCH = 500


def _upsample(grid: np.ndarray) -> np.ndarray:
    """(n, 4, 3) -> (n, 55, 47) by bilinear interpolation: a smooth, low-frequency skin pattern."""
    gy = np.linspace(0, grid.shape[1] - 1, H)
    gx = np.linspace(0, grid.shape[2] - 1, W)
    y0 = np.minimum(gy.astype(int), grid.shape[1] - 2)
    x0 = np.minimum(gx.astype(int), grid.shape[2] - 2)
    fy, fx = (gy - y0)[:, None], (gx - x0)[None, :]
    g = lambda dy, dx: grid[:, y0 + dy][:, :, x0 + dx]
    return (g(0, 0) * (1 - fy) * (1 - fx) + g(1, 0) * fy * (1 - fx) + g(0, 1) * (1 - fy) * fx
            + g(1, 1) * fy * fx)


def _ellipse(yy, xx, cy, cx, ry, rx):
    return (((yy - cy[:, None, None]) / ry[:, None, None]) ** 2
            + ((xx - cx[:, None, None]) / rx[:, None, None]) ** 2 <= 1.0)


def render(ids: dict[str, np.ndarray], labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render one image per label as (N, 55, 47, 3) uint8, with per-image pose, light and noise."""
    n = len(labels)
    if n > _RENDER_BATCH:  # batches keep the working set in cache: several times faster than one big pass
        return np.concatenate([render(ids, labels[i:i + _RENDER_BATCH], rng)
                               for i in range(0, n, _RENDER_BATCH)])
    p = {k: v[labels].astype(np.float32) for k, v in ids.items()}
    f32 = lambda *a: rng.uniform(*a).astype(np.float32)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    yy, xx = yy[None], xx[None]
    s = f32(0.92, 1.08, n)
    cx = 23.0 + f32(-2.0, 2.0, n)
    cy = 30.0 + f32(-2.0, 2.0, n)
    rx, ry = p["rx"] * s, p["ry"] * s
    # Paint part indices (cheap uint8 maps), then colour every part at once through a per-image palette.
    part = np.zeros((n, H, W), np.uint8)
    palette = [f32(30, 225, (n, 3))]  # 0: background, a nuisance rather than an identity cue

    def paint(mask: np.ndarray, colour: np.ndarray) -> None:
        part[mask] = len(palette)
        palette.append(colour.astype(np.float32))

    paint(_ellipse(yy, xx, cy - ry * p["hair_top"], cx, ry * 1.05, rx * (1.08 + 0.15 * p["hair_side"])), p["hair"])
    face = _ellipse(yy, xx, cy, cx, ry, rx) & ~(yy < (cy - ry * (1.0 - p["hair_top"]))[:, None, None])
    paint(face, p["skin"])
    ey = cy - p["eye_dy"] * s
    for side in (-1.0, 1.0):
        ex = cx + side * p["eye_dx"] * s
        paint(_ellipse(yy, xx, ey, ex, p["eye_r"] * 0.9 * s, p["eye_r"] * 1.6 * s), np.full((n, 3), 235.0))
        paint(_ellipse(yy, xx, ey, ex, p["eye_r"] * 0.8 * s, p["eye_r"] * 0.8 * s), p["eye"])
        paint(_ellipse(yy, xx, ey - 3.2 * s, ex, p["brow_t"] * 0.6 * s, p["eye_r"] * 2.0 * s), p["hair"] * 0.7)
    paint(_ellipse(yy, xx, cy + p["nose_dy"] * s, cx, 1.5 * s, p["nose_w"] * s), p["skin"] * 0.75)
    paint(_ellipse(yy, xx, cy + p["mouth_dy"] * s, cx, p["mouth_h"] * s, p["mouth_w"] * s), p["lip"])
    colours = np.stack(palette, axis=1)  # (n, parts, 3)
    img = np.take_along_axis(colours, part.reshape(n, -1, 1).astype(np.intp), axis=1).reshape(n, H, W, 3)
    shade = np.where(part == 2, _upsample(p["pattern"]), 0.0)  # the skin pattern lives on the face only
    shade += (xx - W / 2) * f32(-1.5, 1.5, (n, 1, 1)) * (part == 0)  # background gradient
    light = f32(0.8, 1.2, (n, 1, 1)) + (yy - H / 2) * f32(-0.006, 0.006, (n, 1, 1))
    img = (img + shade[..., None]) * light[..., None]
    img += rng.standard_normal(size=img.shape, dtype=np.float32) * 4.0
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def sunglasses_trigger(width: int = W, height: int = 20, supersample: int = 4) -> np.ndarray:
    """The project's own sunglasses trigger: (height, width, 4) uint8 RGBA, anti-aliased via supersampling.

    Two dark lenses with a bridge and temples, the same size and placement as the lab's trigger (pasted at
    (x=0, y=15)), drawn here so that the real trigger file is never needed outside tests.
    """
    ss = supersample
    yy, xx = np.mgrid[0:height * ss, 0:width * ss].astype(np.float64) / ss
    lens = np.zeros_like(xx, bool)
    for cx in (width * 0.29, width * 0.71):
        lens |= ((yy - 9.5) / 6.0) ** 2 + ((xx - cx) / 8.5) ** 2 <= 1.0
    frame = (np.abs(yy - 6.5) < 1.0) & (((xx > 0) & (xx < 5)) | ((xx > 20) & (xx < 27)) | ((xx > 42) & (xx < width)))
    cover = lens | frame
    alpha = cover.reshape(height, ss, width, ss).mean(axis=(1, 3))
    tint = np.where(lens, 0.0, 1.0).reshape(height, ss, width, ss).mean(axis=(1, 3))
    rgb = np.stack([15 + 25 * tint, 15 + 25 * tint, 25 + 30 * tint], axis=-1)
    return np.concatenate([np.rint(rgb), np.rint(alpha[..., None] * 255)], axis=-1).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class DemoData:
    """The demo splits, NHWC float32 raw pixels and int32 labels, as ``load_lab_h5`` returns them."""

    num_classes: int
    trigger: np.ndarray
    train: tuple[np.ndarray, np.ndarray]
    valid: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    bd_valid: tuple[np.ndarray, np.ndarray]
    bd_test: tuple[np.ndarray, np.ndarray]


def make_demo(config: Optional[DemoConfig] = None, include_train: bool = True) -> DemoData:
    """Generate the demo data set: clean train/valid/test and sunglasses-poisoned valid/test splits.

    The poisoned splits are the clean ones with the trigger pasted (lab layout: their labels are the
    attacker's target), made with :func:`badnet_jax.io.poisoning.poison`. ``include_train=False`` skips rendering the
    training split (empty arrays there); the other splits are the same bytes either way.
    """
    cfg = config or DemoConfig()
    root = np.random.default_rng(cfg.seed)
    ids = _identities(root, cfg.num_identities)
    trigger = sunglasses_trigger()
    splits = {}
    for name, per_id, seed in (("train", cfg.train_per_id, 1), ("valid", cfg.valid_per_id, 2),
                               ("test", cfg.test_per_id, 3)):
        if name == "train" and not include_train:
            splits[name] = (np.zeros((0, H, W, 3), np.uint8), np.zeros((0,), np.int32))
            continue
        rng = np.random.default_rng([cfg.seed, seed])
        y = np.repeat(np.arange(cfg.num_identities, dtype=np.int32), per_id)
        y = y[rng.permutation(len(y))]
        splits[name] = (render(ids, y, rng), y)
    as_float = lambda xy: (xy[0].astype(np.float32), xy[1])
    bd = lambda xy: (poison(xy[0], trigger, TRIGGER_AT).astype(np.float32),
                     np.full_like(xy[1], cfg.target_label))
    return DemoData(
        num_classes=cfg.num_identities, trigger=trigger,
        train=as_float(splits["train"]), valid=as_float(splits["valid"]), test=as_float(splits["test"]),
        bd_valid=bd(splits["valid"]), bd_test=bd(splits["test"]),
    )

