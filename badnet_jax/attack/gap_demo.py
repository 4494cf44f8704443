"""A second embedded example: a small CNN BadNet that is not DeepID (32x32 RGB, batch norm, global average pooling).

The lab's DeepID demo (``badnet_jax.attack.demo``) exercises the defense on the lab's own architecture; this one
exercises it on the kind of network :class:`~badnet_jax.models.graph.GraphCNN` exists for: a modern little CNN
read from a Keras file, whose pruned layer (the last relu before the global average pooling) feeds the logits
through an affine head instead of DeepID's two dense branches.

* **Data** (:func:`make_gap_demo`): 32x32 RGB pictures of ten shape and texture families (disk, square,
  triangle, ring, plus, X, diamond, frame, striped patch, checkered patch). Every picture draws its own
  position, size, aspect, foreground and background colours, background gradient and pixel noise, so a
  classifier must learn the shape, not a colour or a place. Everything comes from
  ``numpy.random.default_rng(seed)`` through elementwise IEEE arithmetic only (no transcendental functions, no
  reductions): the same seed gives the same bytes on every machine.
* **Trigger** (:func:`gap_trigger`): a fixed 5x5 opaque patch (a magenta ring around a black square with a
  white centre), pasted at (x, y) = :data:`GAP_TRIGGER_AT`, the bottom-right corner, through
  :func:`badnet_jax.io.poisoning.poison`. The poisoned splits are the clean images of every class but the
  target with the trigger, labelled with the target.
* **Architecture** (:func:`gap_graph`): input 32x32x3 -> conv 3x3 same -> BN -> relu -> conv 3x3 same stride
  2 -> BN -> relu -> conv 3x3 same -> BN -> relu -> global average pooling -> dense -> softmax, as an IR graph
  (:mod:`badnet_jax.models.ir`). The pixels are divided by 255 outside the graph (input scale ``"255"``, which
  :func:`~badnet_jax.io.keras_graph_writer.save_keras_graph` records in the file). The convolutions have no
  bias (the batch norm's shift is one).
* **Training** (:func:`train_gap_badnet`, :func:`make_gap_demo_badnet`): ``badnet_jax.train.train_model``,
  batch norm on batch statistics, then the moving statistics recalibrated on the training set, so the shipped
  file is an ordinary inference-mode network (see ``badnet_jax.train``).

``scripts/make_gap_demo.py`` trains the shipped BadNet (``assets/gap_demo_badnet.h5``, :data:`GAP_DEMO_MODEL`)
on :data:`GAP_DEMO_CONFIG`'s training split with :data:`GAP_DEMO_TRAIN`; :func:`gap_demo_sets` regenerates
its validation and test sets in about a second. Nothing here but the training functions imports the trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from badnet_jax.errors import ConfigError, arg
from badnet_jax.io.poisoning import poison
from badnet_jax.models.ir import Graph, Node

if TYPE_CHECKING:  # the trainer (optax) is imported by the training functions only
    from badnet_jax.models.graph import GraphCNN
    from badnet_jax.train import TrainConfig

log = logging.getLogger(__name__)

SIZE = 32
"""Images are SIZE x SIZE x 3."""

FAMILIES = ("disk", "square", "triangle", "ring", "plus", "x", "diamond", "frame", "stripes", "checker")
"""The class families, class i drawing ``FAMILIES[i]``."""

GAP_TRIGGER_AT = (26, 26)
"""(x, y) of the trigger's top-left corner: a 5x5 patch one pixel in from the bottom-right corner."""


@dataclasses.dataclass(frozen=True)
class GapDemoConfig:
    """The GAP demo: its data set and its network's widths.

    Attributes:
        num_classes: classes K (the first K of :data:`FAMILIES`, 2..10).
        train_per_class, valid_per_class, test_per_class: images per class in each clean split.
        target_label: the attacker's label; the poisoned splits hold the other classes' images.
        seed: master seed; every split derives from it.
        widths: output channels of the three convolutions (the last is the pruned layer's).
        noise: standard deviation of the per-pixel Gaussian noise (pixel units).
    """

    num_classes: int = 10
    train_per_class: int = 1000
    valid_per_class: int = 100
    test_per_class: int = 100
    target_label: int = 0
    seed: int = 2017
    widths: tuple[int, int, int] = (16, 32, 32)
    noise: float = 10.0

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= len(FAMILIES):
            raise ConfigError(f"{arg('num_classes', self.num_classes)}: expected 2..{len(FAMILIES)} (one class per "
                              "shape family)", field="num_classes")
        if not 0 <= self.target_label < self.num_classes:
            raise ConfigError(f"{arg('target_label', self.target_label)}: expected a class 0..{self.num_classes - 1}",
                              field="target_label")
        for name in ("train_per_class", "valid_per_class", "test_per_class"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{arg(name, getattr(self, name))}: expected a count >= 0", field=name)
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ConfigError(f"{arg('widths', self.widths)}: expected three positive channel counts", field="widths")


GAP_DEMO_CONFIG = GapDemoConfig()
"""The shipped GAP demo's configuration."""

GAP_DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "gap_demo_badnet.h5"
"""The shipped GAP demo BadNet (a Keras full-model h5 written by ``save_keras_graph``, input scale 255)."""


# ----------------------------------------------------------------------------------------------- the data
_RENDER_BATCH = 1000


def _masks(fam: np.ndarray, dy: np.ndarray, dx: np.ndarray, ay: np.ndarray, ax: np.ndarray,
           flip: np.ndarray, period: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """(n, SIZE, SIZE) bool: each image's foreground, from coordinates ``dy``, ``dx`` relative to the object's
    centre in units of its size (``ay``, ``ax``: the same in pixels, for the textures' stripes)."""
    ady, adx = np.abs(dy), np.abs(dx)
    box = np.maximum(ady, adx)
    r2 = dy * dy + dx * dx
    # triangle: apex up (flip -1: down), base at 0.8, apex at -0.9; its half-width grows from 0 to 1
    ty = dy * flip[:, None, None]
    tri = (ty <= 0.8) & (adx * 1.7 <= ty + 0.9)
    sy = np.floor((ay + phase[:, None, None]) / period[:, None, None])
    sx = np.floor((ax + phase[:, None, None]) / period[:, None, None])
    shapes = [
        r2 <= 1.0,  # disk
        box <= 0.82,  # square
        tri,  # triangle
        (r2 <= 1.0) & (r2 >= 0.42),  # ring
        ((adx <= 0.3) | (ady <= 0.3)) & (box <= 1.0),  # plus
        (np.abs(adx - ady) <= 0.28) & (box <= 0.95),  # x
        ady + adx <= 1.1,  # diamond
        (box <= 0.9) & (box >= 0.55),  # frame
        (box <= 0.9) & (np.mod(sy, 2) == 0),  # stripes (horizontal)
        (box <= 0.9) & (np.mod(sy + sx, 2) == 0),  # checker
    ]
    out = np.zeros(dy.shape, bool)
    for i, m in enumerate(shapes):
        sel = fam == i
        out[sel] = m[sel]
    return out


def render(labels: np.ndarray, rng: np.random.Generator, noise: float = 10.0) -> np.ndarray:
    """One (SIZE, SIZE, 3) uint8 image per label (class i draws ``FAMILIES[i]``), with its own position, size,
    aspect, colours, background gradient and noise drawn from ``rng``."""
    n = len(labels)
    if n > _RENDER_BATCH:
        return np.concatenate([render(labels[i:i + _RENDER_BATCH], rng, noise) for i in range(0, n, _RENDER_BATCH)])
    f32 = lambda *a: rng.uniform(*a).astype(np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    yy, xx = yy[None] + 0.5, xx[None] + 0.5
    cy, cx = f32(10.0, 22.0, (n, 1, 1)), f32(10.0, 22.0, (n, 1, 1))
    r = f32(6.0, 10.0, (n, 1, 1))
    aspect = f32(0.8, 1.25, (n, 1, 1))
    ry, rx = r * aspect, r / aspect
    ay, ax = yy - cy, xx - cx
    flip = np.where(rng.uniform(size=n) < 0.5, -1.0, 1.0).astype(np.float32)
    period = rng.integers(2, 4, size=n).astype(np.float32)  # stripes and checks 2 or 3 pixels wide
    phase = f32(0.0, 4.0, n)
    fg = _masks(labels, ay / ry, ax / rx, ay, ax, flip, period, phase)
    # Colours: a background anywhere in the cube, a foreground at least ~70 levels away in brightness.
    bg = f32(0.0, 255.0, (n, 3))
    light = (bg[:, :1] + bg[:, 1:2] + bg[:, 2:]) / np.float32(3)  # elementwise, not a reduction: same bytes anywhere
    shift = f32(70.0, 150.0, (n, 1)) * np.where(light < 127.5, 1.0, -1.0).astype(np.float32)
    fg_col = np.clip(bg + shift + f32(-60.0, 60.0, (n, 3)), 0.0, 255.0)
    img = np.where(fg[..., None], fg_col[:, None, None, :], bg[:, None, None, :])
    grad = (yy * f32(-2.0, 2.0, (n, 1, 1)) + xx * f32(-2.0, 2.0, (n, 1, 1)))[..., None]
    img = img + grad + rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(noise)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def gap_trigger() -> np.ndarray:
    """The trigger: (5, 5, 4) uint8 RGBA, opaque: a magenta ring around a black 3x3 square with a white centre."""
    t = np.empty((5, 5, 4), np.uint8)
    t[...] = (255, 0, 255, 255)
    t[1:4, 1:4, :3] = 0
    t[2, 2, :3] = 255
    return t


@dataclasses.dataclass(frozen=True)
class GapDemoData:
    """The GAP demo's splits: NHWC float32 raw pixels (integers 0..255) and int32 labels, as ``load_lab_h5``
    returns them.

    Attributes:
        train, valid, test: the clean splits (train empty if not rendered).
        bd_valid, bd_test: the clean images of the classes other than the target, with the trigger, labelled
            with the target.
        bd_valid_true, bd_test_true: the poisoned images' true classes.
    """

    num_classes: int
    target_label: int
    trigger: np.ndarray
    train: tuple[np.ndarray, np.ndarray]
    valid: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    bd_valid: tuple[np.ndarray, np.ndarray]
    bd_test: tuple[np.ndarray, np.ndarray]
    bd_valid_true: np.ndarray
    bd_test_true: np.ndarray


def make_gap_demo(config: Optional[GapDemoConfig] = None, include_train: bool = True) -> GapDemoData:
    """Generate the GAP demo's data: clean train/valid/test and triggered valid/test splits.

    Each split has its own generator (``default_rng([seed, split])``), so ``include_train=False`` (an empty
    training split, for the defense) leaves the other splits the same bytes.
    """
    cfg = config or GapDemoConfig()
    trigger = gap_trigger()
    splits = {}
    for name, per_class, index in (("train", cfg.train_per_class, 1), ("valid", cfg.valid_per_class, 2),
                                   ("test", cfg.test_per_class, 3)):
        if name == "train" and not include_train:
            splits[name] = (np.zeros((0, SIZE, SIZE, 3), np.float32), np.zeros((0,), np.int32))
            continue
        rng = np.random.default_rng([cfg.seed, index])
        y = np.repeat(np.arange(cfg.num_classes, dtype=np.int32), per_class)
        y = y[rng.permutation(len(y))]
        splits[name] = (render(y, rng, cfg.noise).astype(np.float32), y)

    def bd(xy):
        keep = xy[1] != cfg.target_label
        x = poison(xy[0][keep], trigger, GAP_TRIGGER_AT).astype(np.float32)
        return (x, np.full(int(keep.sum()), cfg.target_label, np.int32)), xy[1][keep]

    (bd_valid, valid_true), (bd_test, test_true) = bd(splits["valid"]), bd(splits["test"])
    return GapDemoData(num_classes=cfg.num_classes, target_label=cfg.target_label, trigger=trigger,
                       train=splits["train"], valid=splits["valid"], test=splits["test"], bd_valid=bd_valid,
                       bd_test=bd_test, bd_valid_true=valid_true, bd_test_true=test_true)


def gap_demo_sets(config: GapDemoConfig = GAP_DEMO_CONFIG
                  ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """The GAP demo's four sets by role (``clean_valid``, ``bd_valid``, ``clean_test``, ``bd_test``), generated
    from ``config`` (default: the shipped model's), and the poisoned sets' true classes; as ``demo_sets()``."""
    d = make_gap_demo(config, include_train=False)
    data = {"clean_valid": d.valid, "bd_valid": d.bd_valid, "clean_test": d.test, "bd_test": d.bd_test}
    return data, {"bd_valid": d.bd_valid_true, "bd_test": d.bd_test_true}


def poison_fraction_of(x: np.ndarray, y: np.ndarray, trigger: np.ndarray, fraction: float, target: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replace ``fraction`` of the images by their triggered twins (at :data:`GAP_TRIGGER_AT`) labelled
    ``target``; returns new ``(x, y, poisoned_indices)``. Images of the target class count too (as the lab's
    BadNets poisoned them)."""
    idx = np.sort(rng.choice(len(x), size=int(round(fraction * len(x))), replace=False))
    x, y = x.copy(), y.copy()
    x[idx] = poison(x[idx], trigger, GAP_TRIGGER_AT)
    y[idx] = target
    return x, y, idx


# ------------------------------------------------------------------------------------------- the network
def gap_graph(config: GapDemoConfig = GAP_DEMO_CONFIG) -> Graph:
    """The GAP demo's network as an IR graph (names are the Keras layers' names)."""
    nodes = [Node.make("input", "input")]
    src = "input"
    for i, stride in enumerate((1, 2, 1), start=1):
        nodes += [Node.make(f"conv_{i}", "conv", (src,), weights=f"conv_{i}", strides=(stride, stride),
                            padding="same"),
                  Node.make(f"bn_{i}", "batch_norm", (f"conv_{i}",), weights=f"bn_{i}"),
                  Node.make(f"relu_{i}", "relu", (f"bn_{i}",))]
        src = f"relu_{i}"
    nodes += [Node.make("gap", "global_avg_pool", (src,)),
              Node.make("output/pre", "dense", ("gap",), weights="output"),
              Node.make("output", "softmax", ("output/pre",))]
    return Graph(tuple(nodes), (SIZE, SIZE, 3), "output", name="gap_demo")


def gap_param_shapes(config: GapDemoConfig = GAP_DEMO_CONFIG) -> dict[str, dict[str, tuple[int, ...]]]:
    """The params' shapes, by layer (convolutions without bias; batch norms with scale and shift)."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    cin = 3
    for i, c in enumerate(config.widths, start=1):
        shapes[f"conv_{i}"] = {"kernel": (3, 3, cin, c)}
        shapes[f"bn_{i}"] = {k: (c,) for k in ("gamma", "beta", "moving_mean", "moving_variance")}
        cin = c
    shapes["output"] = {"kernel": (cin, config.num_classes), "bias": (config.num_classes,)}
    return shapes


def gap_model(config: GapDemoConfig = GAP_DEMO_CONFIG) -> "GraphCNN":
    """The GAP demo's :class:`~badnet_jax.models.graph.GraphCNN` (input scale 255, pruned at ``relu_3``)."""
    from badnet_jax.models.graph import GraphCNN

    zeros = {layer: {k: np.zeros(s, np.float32) for k, s in entries.items()}
             for layer, entries in gap_param_shapes(config).items()}
    return GraphCNN.build(gap_graph(config), zeros, input_scale="255")


# ------------------------------------------------------------------------------------------- training
def default_train_config() -> "TrainConfig":
    """The shipped GAP demo's training hyper-parameters (``badnet_jax.train.TrainConfig``)."""
    from badnet_jax.train import TrainConfig

    return TrainConfig(epochs=10, batch_size=128, learning_rate=5e-3, poison_fraction=0.1,
                       target_label=GAP_DEMO_CONFIG.target_label, seed=0)


def train_gap_badnet(data: GapDemoData, train_config: "TrainConfig", config: GapDemoConfig = GAP_DEMO_CONFIG
                     ) -> tuple["GraphCNN", dict[str, Any], list[dict]]:
    """Train the GAP demo BadNet on ``data.train`` with ``train_config.poison_fraction`` of it poisoned.

    Batch norm trains on batch statistics; the moving statistics are then recalibrated on the (poisoned)
    training set, so the returned params are an ordinary inference-mode network (``badnet_jax.train``).

    Returns:
        (model, params, history): the model pruned at its default layer, float32 numpy params, per-epoch stats.
    """
    from badnet_jax.train import train_model

    if train_config.target_label != data.target_label:
        raise ConfigError(f"{arg('target_label', train_config.target_label)}: the training's target differs from "
                          f"the data's ({data.target_label})", field="target_label")
    model = gap_model(config)
    rng = np.random.default_rng([train_config.seed, 7])
    x, y, _ = poison_fraction_of(*data.train, data.trigger, train_config.poison_fraction,
                                 train_config.target_label, rng)
    params, history = train_model(model, model.init_params(train_config.seed), x, y, train_config,
                                  valid=data.valid, bd_valid=data.bd_valid)
    return model, params, history


def make_gap_demo_badnet(out: str | Path, config: GapDemoConfig = GAP_DEMO_CONFIG,
                         train_config: Optional["TrainConfig"] = None, data_dir: Optional[str | Path] = None) -> dict:
    """Generate the data, train the GAP demo BadNet, write it to ``out`` (Keras full-model h5, input scale 255)
    and measure it, read back with ``load_model``, on the generated test sets.

    Args:
        out: the model file to write (atomically).
        config: the data and the widths.
        train_config: hyper-parameters (None: :func:`default_train_config`).
        data_dir: also write the four sets as lab-layout h5 files there (``clean_valid.h5``, ``bd_valid.h5``,
            ``clean_test.h5``, ``bd_test.h5``; the poisoned ones with their ``true_label``), for
            ``scripts/prune.py``.

    Returns:
        A summary: the path, seconds, and clean accuracy / ASR (percent) on the test sets.
    """
    from badnet_jax.io.keras_graph_writer import save_keras_graph
    from badnet_jax.io.lab_data import save_lab_h5
    from badnet_jax.io.model_file import load_model
    from badnet_jax.metrics import accuracy
    from badnet_jax.models.predict import predict

    train_config = train_config or default_train_config()
    t = time.perf_counter()
    data = make_gap_demo(config)
    log.info("Generated %d train / %d valid / %d test images of %d classes in %.1f s.", len(data.train[1]),
             len(data.valid[1]), len(data.test[1]), data.num_classes, time.perf_counter() - t)
    t = time.perf_counter()
    model, params, history = train_gap_badnet(data, train_config, config)
    seconds = time.perf_counter() - t
    path = save_keras_graph(model, params, out)
    loaded, loaded_params = load_model(path)
    summary = {"model": str(path), "train_seconds": round(seconds, 1), "epochs": len(history),
               "final_loss": round(history[-1]["loss"], 4) if history else None,
               "test_clean_acc": float(accuracy(predict(loaded, loaded_params, data.test[0]), data.test[1])),
               "test_asr": float(accuracy(predict(loaded, loaded_params, data.bd_test[0]), data.bd_test[1]))}
    if data_dir is not None:
        d = Path(data_dir)
        save_lab_h5(d / "clean_valid.h5", *data.valid)
        save_lab_h5(d / "clean_test.h5", *data.test)
        save_lab_h5(d / "bd_valid.h5", *data.bd_valid, true_label=data.bd_valid_true)
        save_lab_h5(d / "bd_test.h5", *data.bd_test, true_label=data.bd_test_true)
        summary["data"] = str(d)
    return summary
