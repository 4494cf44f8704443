"""badnet_jax.models.deepid: the lab's DeepID's layer stages against the float64 NumPy DeepID (tests/numpy_ref.py).

The stages are what the benchmark times layer by layer; here they must compute the network's own values.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from badnet_jax.models.deepid import DeepID
from tests import numpy_ref


def test_the_trunk_stages_compose_to_the_features_and_each_stage_reads_its_real_input():
    model = DeepID(37, input_scale="255")
    params = model.init_params(3)
    x = np.random.default_rng(0).integers(0, 256, (5, 55, 47, 3)).astype(np.float32)
    stages = model.layer_stages()
    inputs = model.stage_inputs(params, jnp.asarray(x))
    assert [s.name for s in stages] == list(inputs) == ["conv_1", "conv_2", "conv_3", "fc_1", "conv_4", "fc_2",
                                                        "output"]
    np.testing.assert_allclose(np.asarray(inputs["conv_1"]), x / 255.0, rtol=1e-6)  # the scaled pixels
    v = inputs["conv_1"]
    for stage in stages[:3]:
        v = stage.fn(params, v)
        if stage.name != "conv_3":
            np.testing.assert_array_equal(np.asarray(v), np.asarray(inputs[f"conv_{int(stage.name[-1]) + 1}"]))
    np.testing.assert_array_equal(np.asarray(v), np.asarray(model.features(params, jnp.asarray(x))))
    feats64 = numpy_ref.pool3(params, x.astype(np.float64) / 255)
    np.testing.assert_allclose(np.asarray(v), feats64, rtol=1e-5, atol=1e-5)
    # The head's layers on their inputs: fc_1 + fc_2 (after conv_4) is the hidden layer; output gives the logits'
    # argmax and top-2 gap (what the sweep computes of them).
    by_name = {s.name: s.fn for s in stages}
    fc1 = by_name["fc_1"](params, inputs["fc_1"])
    fc2 = by_name["fc_2"](params, inputs["fc_2"])
    np.testing.assert_allclose(np.maximum(np.asarray(fc1 + fc2), 0), numpy_ref.hidden(params, feats64),
                               rtol=1e-4, atol=1e-4)
    arg, gap, _ = by_name["output"](params, inputs["output"])
    logits64 = numpy_ref.head(params, feats64)
    top2 = np.sort(logits64, axis=1)[:, -2:]
    np.testing.assert_array_equal(np.asarray(arg), logits64.argmax(axis=1))
    np.testing.assert_allclose(np.asarray(gap), top2[:, 1] - top2[:, 0], rtol=1e-3, atol=1e-4)
    c4 = np.asarray(by_name["conv_4"](params, inputs["conv_4"]))
    np.testing.assert_array_equal(c4.reshape(5, -1), np.asarray(inputs["fc_2"]))
