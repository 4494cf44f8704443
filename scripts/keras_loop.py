"""The seed's pruning loop in Keras: the independent baseline that badnet-jax is timed and checked against.

    KERAS_BACKEND=tensorflow /work/venvs/tf/bin/python scripts/keras_loop.py --model models/bd_weights.h5 \\
        --clean_valid data/cl/valid.h5 --bd_valid data/bd/bd_valid.h5 --clean_test data/cl/test.h5 \\
        --bd_test data/bd/bd_test.h5 --steps 3 --out keras_loop.json

Why it exists: badnet-jax claims a speed-up over the lab's own algorithm, and its curve must be the lab's. This
script is that algorithm as the lab wrote it, in Keras: load B, rank pool_3's channels by mean activation over
the clean validation set (least active first), then for each k = 1..60 zero conv_3's kernel and bias of the
k-th channel with ``get_weights``/``set_weights`` (ReLU and max pooling then make that pool_3 channel zero),
``model.predict`` the clean and poisoned validation and test sets, and record accuracy and attack success rate
(ASR: the share of poisoned images predicted as the attacker's label, which the poisoned files carry: 0 in the
lab's). With ``--save_dir`` it saves B' (``model.save``, a Keras h5) at the first k past each drop X, as the lab
did. ``--steps`` runs the first steps only; the JSON then also gives the time scaled to all 60 steps
(``scaled_60_s``: the steps not run cost the mean of the run's steps after the first).

Independent on purpose: it imports keras, h5py, numpy, absl and ``keras_deepid.py`` beside it, nothing of
badnet_jax, so it is an independent baseline (``scripts/versus_keras.py`` times both in one run) and an
independent oracle for the curve (tests/test_keras_loop.py). keras and tensorflow are not dependencies of the
package: the timing runs use tensorflow-cpu in a separate virtual environment; the tests run this script with
the test extra's keras and its JAX backend. The backend is whatever ``KERAS_BACKEND`` says (Keras' default:
tensorflow) and is recorded in the JSON with the versions.

Two choices where a literal transcription would be ambiguous: the mean activations are summed in float64
and ties are broken by channel index (a stable sort), as badnet-jax ranks, so the two orders are comparable
(the lab's dead channels all tie at 0); and a full Keras model file (``model_config`` attribute, such as the
lab's bd_net.h5) is opened with ``keras.models.load_model``, a weights-only file (bd_weights.h5, Keras 2.3.1)
is loaded into DeepID built by ``scripts/keras_deepid.py`` (the builder the converter's Keras oracle uses too,
with the lab's layer names, so the lab's file loads into it by Keras' own ``load_weights``).
"""

from __future__ import annotations

import json
from fractions import Fraction
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from absl import app, flags

from keras_deepid import build_keras_deepid  # beside this script (sys.path[0]); keras only

MODEL = flags.DEFINE_string("model", None, "The BadNet: a Keras full-model h5 or the lab's DeepID weights h5.",
                            required=True)
CLEAN_VALID = flags.DEFINE_string("clean_valid", None, "Clean validation h5 (lab layout).", required=True)
BD_VALID = flags.DEFINE_string("bd_valid", None, "Poisoned validation h5 (lab layout).", required=True)
CLEAN_TEST = flags.DEFINE_string("clean_test", None, "Clean test h5 (lab layout).", required=True)
BD_TEST = flags.DEFINE_string("bd_test", None, "Poisoned test h5 (lab layout).", required=True)
STEPS = flags.DEFINE_integer("steps", 60, "How many of the pruning steps to run (time scaled to all of them).",
                             lower_bound=1)
DROPS = flags.DEFINE_list("drops", ["0.02", "0.04", "0.10", "0.30"], "Accuracy drops X (fractions: 0.04 = 4 points).")
SAVE_DIR = flags.DEFINE_string("save_dir", None, "Save B' at each drop's cut here (model.save, h5); none if unset.")
INPUT_SCALE = flags.DEFINE_enum("input_scale", "raw", ["raw", "255"], "raw pixels 0..255 (the lab's B) or / 255.")
BATCH = flags.DEFINE_integer("batch_size", None, "model.predict's batch size (default: Keras' own, 32).")
OUT = flags.DEFINE_string("out", "keras_loop.json", "Where to write the JSON results.")

LAYER_PRUNED, LAYER_ZEROED = "pool_3", "conv_3"
DROP_TEXT: dict[float, str] = {}  # each drop as typed, for its exact rational value


def load_badnet(path: str):
    """B from a Keras full-model file, or the lab's weights-only file loaded into DeepID."""
    import keras

    with h5py.File(path, "r") as f:
        full_model = "model_config" in f.attrs
        num_classes = None if full_model else f["output/output/bias:0"].shape[0]
    if full_model:
        return keras.models.load_model(path, compile=False)
    model = build_keras_deepid(num_classes)
    model.load_weights(path)
    return model


def load_data(path: str, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """The lab's data loader: ``data`` (N, 3, H, W) -> NHWC float32, ``label`` -> int labels."""
    with h5py.File(path, "r") as f:
        x = np.asarray(f["data"], dtype=np.float32).transpose(0, 2, 3, 1)
        y = np.asarray(f["label"]).astype(np.int64)
    return (x / 255.0 if scale == "255" else x), y


def backend_versions() -> dict:
    """Keras, its backend and the libraries this run used."""
    import keras

    backend = keras.backend.backend()
    versions = {"keras": keras.__version__, "numpy": np.__version__, "h5py": h5py.__version__,
                "python": platform.python_version()}
    lib = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend)
    if lib is not None:
        versions[lib] = __import__(lib).__version__
    return {"backend": backend, "versions": versions}


def write_json_atomically(path: str, obj: dict) -> None:
    """Write ``obj`` as JSON to a temporary file beside ``path``, then rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    t_start = time.perf_counter()
    import keras

    drops = [float(d) for d in DROPS.value]
    bad = [d for d in drops if not 0 < d < 1]
    if bad:
        raise app.UsageError(f"--drops {bad[0]:g}: a drop is a fraction of accuracy in (0, 1), e.g. 0.04 for 4 points")
    DROP_TEXT.update({float(d): d.strip() for d in DROPS.value})
    predict_kw = {"verbose": 0} if BATCH.value is None else {"verbose": 0, "batch_size": BATCH.value}
    timings: dict = {"import_s": time.perf_counter() - t_start}

    t = time.perf_counter()
    model = load_badnet(MODEL.value)
    timings["load_model_s"] = time.perf_counter() - t
    t = time.perf_counter()
    names = ("valid", "bd_valid", "test", "bd_test")
    data = {n: load_data(p, INPUT_SCALE.value)
            for n, p in zip(names, (CLEAN_VALID.value, BD_VALID.value, CLEAN_TEST.value, BD_TEST.value))}
    timings["load_data_s"] = time.perf_counter() - t

    # Rank: mean pool_3 activation over the clean validation set, least active first.
    t = time.perf_counter()
    features = keras.Model(model.inputs, model.get_layer(LAYER_PRUNED).output)
    acts = np.asarray(features.predict(data["valid"][0], **predict_kw))
    mean_act = acts.mean(axis=(0, 1, 2), dtype=np.float64)
    order = np.argsort(mean_act, kind="stable")
    del acts
    timings["rank_s"] = time.perf_counter() - t

    hits: dict[str, list[int]] = {n: [] for n in names}

    def evaluate() -> None:
        for n in names:
            x, y = data[n]
            pred = np.argmax(model.predict(x, **predict_kw), axis=1)
            hits[n].append(int(np.sum(pred == y)))

    def rate(n: str, k: int) -> float:
        return 100.0 * hits[n][k] / len(data[n][1])

    t = time.perf_counter()
    evaluate()  # k = 0: B itself
    timings["original_s"] = time.perf_counter() - t

    layer = model.get_layer(LAYER_ZEROED)
    steps = min(STEPS.value, len(order))
    cuts: dict[str, int] = {}
    saved: dict[str, str] = {}
    step_s, save_s = [], 0.0
    for k in range(1, steps + 1):
        t = time.perf_counter()
        kernel, bias = layer.get_weights()
        channel = order[k - 1]
        kernel[..., channel] = 0
        bias[channel] = 0
        layer.set_weights([kernel, bias])
        evaluate()
        for drop in drops:
            # Exact: hits lost / images > drop, in rationals (a float percentage can round across the boundary).
            lost = Fraction(hits["valid"][0] - hits["valid"][k], len(data["valid"][1]))
            if str(drop) not in cuts and lost > Fraction(DROP_TEXT[drop]):
                cuts[str(drop)] = k
                if SAVE_DIR.value:
                    t_save = time.perf_counter()
                    path = os.path.join(SAVE_DIR.value, f"b_prime_drop_{drop:g}.h5")
                    os.makedirs(SAVE_DIR.value, exist_ok=True)
                    model.save(path)
                    saved[str(drop)] = path
                    save_s += time.perf_counter() - t_save
        step_s.append(time.perf_counter() - t)
        print(f"k={k:2d} channel {channel:2d}: valid acc {rate('valid', k):.2f}% asr {rate('bd_valid', k):.2f}%  "
              f"test acc {rate('test', k):.2f}% asr {rate('bd_test', k):.2f}%  ({step_s[-1]:.2f} s)", flush=True)

    total = time.perf_counter() - t_start
    steady = float(np.mean(step_s[1:] if len(step_s) > 1 else step_s))  # the first step may pay one-time costs
    timings.update(step_s=step_s, save_s=save_s, total_s=total, steady_step_s=steady,
                   scaled_60_s=total + (len(order) - steps) * steady)
    result = {
        **backend_versions(),
        "model": MODEL.value,
        "inputs": {n: p for n, p in zip(names, (CLEAN_VALID.value, BD_VALID.value, CLEAN_TEST.value, BD_TEST.value))},
        "counts": {n: len(data[n][1]) for n in names},
        "input_scale": INPUT_SCALE.value,
        "batch_size": BATCH.value,
        "steps_run": steps,
        "channels": len(order),
        "mean_activation": mean_act.tolist(),
        "order": order.tolist(),
        "hits": hits,
        "valid_acc": [rate("valid", k) for k in range(steps + 1)],
        "valid_asr": [rate("bd_valid", k) for k in range(steps + 1)],
        "test_acc": [rate("test", k) for k in range(steps + 1)],
        "test_asr": [rate("bd_test", k) for k in range(steps + 1)],
        "cuts": cuts,
        "saved": saved,
        "timings": timings,
    }
    write_json_atomically(OUT.value, result)
    print(f"{steps} steps in {sum(step_s):.1f} s ({steady:.2f} s/step), total {total:.1f} s, "
          f"scaled to {len(order)} steps {timings['scaled_60_s']:.1f} s; wrote {OUT.value}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    app.run(main)
