"""Write lab-layout stand-in data at lab scale (or a multiple) from the real faces, for timing runs.

    python scripts/make_standin.py --out_dir /tmp/labscale            # 11547 valid + 12830 test (x2 poisoned)
    python scripts/make_standin.py --out_dir /tmp/lab10x --scale 10
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from badnet_jax import BadNetError
from badnet_jax.bench import write_standin_lab_data

ASSETS = flags.DEFINE_string("assets", os.environ.get("BADNET_ASSETS", "../shared/assets"), "The shared assets folder.")
OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write the lab layout (data/cl, data/bd).", required=True)
SCALE = flags.DEFINE_integer("scale", 1, "Multiple of the lab's sizes.")


def main(argv: list[str]) -> int:
    del argv
    try:
        written = write_standin_lab_data(ASSETS.value, OUT_DIR.value, SCALE.value)
    except BadNetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written} under {OUT_DIR.value}")
    return 0


if __name__ == "__main__":
    app.run(main)
