"""Write lab-layout stand-in data at lab scale (or a multiple) from the real faces, for timing runs.

    python scripts/make_standin.py --out_dir /tmp/labscale            # 11547 valid + 12830 test (x2 poisoned)
    python scripts/make_standin.py --out_dir /tmp/lab10x --scale 10

The real faces come from ``--assets``, default ``$BADNET_ASSETS`` or the ``shared/assets`` folder beside the
repository (as the tests find them), from whatever folder the script is run.
"""

from __future__ import annotations

import os
from pathlib import Path

from absl import app, flags

from badnet_jax.commands import cli
from badnet_jax.attack.synthetic import write_standin_lab_data

DEFAULT_ASSETS = os.environ.get("BADNET_ASSETS", str(Path(__file__).resolve().parents[2] / "shared" / "assets"))
ASSETS = flags.DEFINE_string("assets", DEFAULT_ASSETS, "The shared assets folder.")
OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write the lab layout (data/cl, data/bd).", required=True)
SCALE = flags.DEFINE_integer("scale", 1, "Multiple of the lab's sizes.")


def main(argv: list[str]) -> int:

    def write() -> int:
        cli.refuse_extra_args(argv)
        written = write_standin_lab_data(ASSETS.value, OUT_DIR.value, SCALE.value)
        print(f"wrote {written} under {OUT_DIR.value}")
        return 0

    return cli.run(write)


if __name__ == "__main__":
    app.run(main)
