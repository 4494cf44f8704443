"""Maintainer tool: lab-layout stand-in data at lab scale (or a multiple) from the real faces, for timing runs.

    python scripts/make_standin.py --out_dir /tmp/labscale            # 11547 valid + 12830 test (x2 poisoned)
    python scripts/make_standin.py --out_dir /tmp/lab10x --scale 10

The lab's own valid/test files are not shipped, so timing runs at lab scale draw their images from the real
lab faces in ``--assets`` (default ``$BADNET_ASSETS`` or the ``shared/assets`` folder beside the repository, as
the tests find them), from whatever folder the script is run. Not part of the package: the asset layout it
reads is this project's.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
from absl import app, flags

from badnet_jax.commands import cli
from badnet_jax.io.lab_data import load_lab_h5
from badnet_jax.io.poisoning import load_trigger, poison
from badnet_jax.model import INPUT_HWC

LAB_SIZES = {"valid": 11547, "test": 12830}  # images in the lab's valid.h5 and test.h5
BLOCK = 8192  # images drawn and written at a time: memory stays small at any scale

DEFAULT_ASSETS = os.environ.get("BADNET_ASSETS", str(Path(__file__).resolve().parents[2] / "shared" / "assets"))
ASSETS = flags.DEFINE_string("assets", DEFAULT_ASSETS, "The shared assets folder.")
OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write the lab layout (data/cl, data/bd).", required=True)
SCALE = flags.DEFINE_integer("scale", 1, "Multiple of the sizes below.")
VALID = flags.DEFINE_integer("valid_images", LAB_SIZES["valid"], "Validation images (x --scale), clean and poisoned.")
TEST = flags.DEFINE_integer("test_images", LAB_SIZES["test"], "Test images (x --scale), clean and poisoned.")


def write_standin_lab_data(assets: str | os.PathLike, out_dir: str | os.PathLike, sizes: dict[str, int],
                           noise: float = 3.0, seed: int = 0) -> dict[str, int]:
    """Lab-layout stand-in files with ``sizes[name]`` images per split (``valid``, ``test``).

    Made from the real lab faces in ``assets`` (valid_subset + test_subset) drawn with replacement, +-noise
    Gaussian pixel noise, and poisoned with the real trigger; ``out_dir`` gets the lab's layout
    (data/cl/{valid,test}.h5, data/bd/bd_{valid,test}.h5). The same seed gives the same bytes.
    """
    a = Path(assets)
    faces = [load_lab_h5(a / "faces/lab3" / f"{n}.h5") for n in ("valid_subset", "test_subset")]
    x, y = np.concatenate([f[0] for f in faces]), np.concatenate([f[1] for f in faces])
    trigger = load_trigger(a / "triggers/sun_glass_trigger.png")
    rng = np.random.default_rng(seed)
    written = {}
    for name in ("valid", "test"):
        n = sizes[name]
        paths = (Path(out_dir) / "data/cl" / f"{name}.h5", Path(out_dir) / "data/bd" / f"bd_{name}.h5")
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(paths[0], "w") as fc, h5py.File(paths[1], "w") as fb:
            for f in (fc, fb):
                chw = (INPUT_HWC[2], INPUT_HWC[0], INPUT_HWC[1])  # the lab's files store channels first
                f.create_dataset("data", shape=(n, *chw), dtype=np.uint8, chunks=(min(n, 256), *chw))
                f.create_dataset("label", shape=(n,), dtype=np.float64)
            for start in range(0, n, BLOCK):
                idx = rng.integers(0, len(x), min(BLOCK, n - start))
                block = np.clip(np.rint(x[idx] + rng.normal(0, noise, size=(len(idx), *INPUT_HWC))), 0, 255)
                fc["data"][start:start + len(idx)] = block.astype(np.uint8).transpose(0, 3, 1, 2)
                fc["label"][start:start + len(idx)] = y[idx]
                fb["data"][start:start + len(idx)] = poison(block, trigger).astype(np.uint8).transpose(0, 3, 1, 2)
                fb["label"][start:start + len(idx)] = 0
        written[name] = n
    return written


def main(argv: list[str]) -> int:

    def write() -> int:
        cli.refuse_extra_args(argv)
        sizes = {"valid": VALID.value * SCALE.value, "test": TEST.value * SCALE.value}
        written = write_standin_lab_data(ASSETS.value, OUT_DIR.value, sizes)
        print(f"wrote {written} under {OUT_DIR.value}")
        return 0

    return cli.run(write)


if __name__ == "__main__":
    app.run(main)
