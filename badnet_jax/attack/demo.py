"""The embedded default: the shipped demo BadNet and its freshly generated synthetic data.

``scripts/make_demo.py`` trains the demo BadNet (``assets/demo_badnet.h5``) on ``DEMO_CONFIG``'s training
split; the defense regenerates the validation and test splits from the same seed in a few seconds. This
module holds only the path and the data (NumPy rendering), so the defense reads the demo without the
training code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from badnet_jax.attack.synthetic import DemoConfig, make_demo

DEMO_CONFIG = DemoConfig()
DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo_badnet.h5"


def demo_sets() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """The demo's four sets by role, generated from ``DEMO_CONFIG``, and the poisoned sets' true classes."""
    d = make_demo(DEMO_CONFIG, include_train=False)
    data = {"clean_valid": d.valid, "bd_valid": d.bd_valid, "clean_test": d.test, "bd_test": d.bd_test}
    # The poisoned splits are the clean ones with the trigger: their true classes are the clean labels.
    return data, {"bd_valid": d.valid[1], "bd_test": d.test[1]}
