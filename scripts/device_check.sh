#!/usr/bin/env bash
# One-shot GPU/TPU check for a lent device (see BUILD_NOTES.md): the timings that choose the accelerator's
# defaults first, then the correctness checks a CPU cannot make, then the defense end to end.
#
# The real assets are read from $BADNET_ASSETS (default ../shared/assets); on a machine that has only a copy
# of the repository, copy them into an ignored folder of it and point BADNET_ASSETS there, e.g.
#   cp -r ../shared/assets .device_assets && BADNET_ASSETS=.device_assets bash scripts/device_check.sh
# Everything goes to ${OUT:-results/device}/log.txt plus a few JSON files; each step has its own time limit
# (together 580 s), so one stuck step cannot stall the rest and the whole check fits one 10-minute call
# (on the H200: about 8 minutes, GPU compiles 2-13 s each).
set -uo pipefail
out="${OUT:-results/device}"
assets="${BADNET_ASSETS:-../shared/assets}"
export BADNET_ASSETS="$assets" PYTHONUNBUFFERED=1
mkdir -p "$out"
log="$out/log.txt"
: > "$log"

# step LIMIT_S NAME CMD...: run CMD with a time limit, all output to the log, one status line to stdout.
step() {
  local limit=$1 name=$2; shift 2
  local t0=$SECONDS
  echo "===== $name (limit ${limit}s)" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "===== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$log"
}

# kernels/ installs as badnet_jax.kernels (pyproject package-dir): an editable install maps it. The machine is
# offline, so no build isolation; if its setuptools cannot build, a link gives the same module layout.
python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$log" 2>&1 || {
  ln -sfn ../kernels badnet_jax/kernels; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
step 20 versions bash -c 'nvidia-smi -L; python3 -c "import jax; print(jax.__version__, jax.devices())";
  python3 -m pip list 2>/dev/null | grep -i -E "^(jax|jaxlib|jax-cuda[0-9]*-plugin|flax|optax|orbax-checkpoint|h5py|numpy) "'
grep -E "^[0-9]+\.[0-9]+|GPU|^(jax|flax|optax|numpy) " "$log" | head -12

# Lab-scale stand-in data from the real faces, with the lab's B (as in docs/benchmarks.md's CPU tables).
lab=/tmp/labscale
step 30 standin python3 scripts/make_standin.py --assets "$assets" --out_dir "$lab"
mkdir -p "$lab/models" && cp "$assets/models/lab3/bd_weights.h5" "$lab/models/"
files="--model $lab/models/bd_weights.h5 --clean_valid $lab/data/cl/valid.h5 --bd_valid $lab/data/bd/bd_valid.h5"

# The whole curve (both validation sets, 61 steps, device and float64 settling) for each number of steps per
# head call and chunk: the accelerator's defaults chosen by measurement (about 80 s on the H200). The head is
# chosen by the kernel's own timing below: a grid with impl=pallas probes the kernel at every combination's
# shapes before timing any, which ran past 120 s there.
step 100 grid_head python3 scripts/benchmark.py $files --repeats 5 --impl reference \
  --grid "batch_steps=0,1,8;chunk=4096,8192" --out "$out/grid_head.json"
# Five rankings in one call against the lab's one order, with one head call per step and batched by 8 (vmapping
# the five orders together, orders_per_call=5 with batch_steps=8, took 1.08x one after the other on the H200).
step 90 grid_orders python3 scripts/benchmark.py $files --repeats 3 --impl reference \
  --grid "batch_steps=0,8" --rank_by activation,clp,l1,random,anp --out "$out/grid_orders.json"
# Each layer's share of the measured peak, and the masked-head kernel alone against XLA's head.
step 80 layers python3 scripts/benchmark.py $files --repeats 5 --layers_only --kernel_block_n 16,32,64 \
  --out "$out/layers.json"
# DeepID's first convolution (55x47x3 -> 20, 4x4, 8192 images) in XLA's form and width-blocked (B = 2, 4):
# does the CPU's weak case exist on the GPU too?
step 20 conv_forms python3 - <<'EOF'
import time
import jax, jax.numpy as jnp, numpy as np
from badnet_jax.kernels.conv2d.api import conv2d
rng = np.random.default_rng(0)
x = jnp.asarray(rng.integers(0, 256, (8192, 55, 47, 3)).astype(np.float32))
k = jnp.asarray(rng.standard_normal((4, 4, 3, 20)).astype(np.float32))
flops = 2 * 8192 * 52 * 44 * 20 * 48
for impl in ("reference", 2, 4):
    f = jax.jit(lambda x, k, impl=impl: conv2d(x, k, impl=impl, relu=True, pool=(2, 2)).sum())
    f(x, k).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter(); f(x, k).block_until_ready(); times.append(time.perf_counter() - t)
    s = float(np.median(times))
    print(f"conv_1 form {impl!s:9s} {1e3 * s:7.2f} ms  {flops / s / 1e12:6.1f} TFLOP/s (8192 images)")
EOF

# The two float64 networks' largest logit difference on the real faces at every step, in u64 x S, against a
# tenth of TIE64_RTOL (the tests below assert it; this prints it). On the H200: 8.45 for lab B, 158.3 for a
# 2020 BadNet fed raw pixels.
step 20 tie64 env PYTHONPATH=. python3 - <<'EOF'
import numpy as np
from badnet_jax import load_keras, load_lab_h5
from badnet_jax.numerics import settling
from badnet_jax.sweep import prefix_masks
from tests import numpy_ref
from tests.conftest import LAB_FILES, asset
x = np.concatenate([load_lab_h5(asset(f), keep_uint8=True)[0] for f in LAB_FILES.values()])
for name, divisor in (("lab3/bd_weights.h5", 1.0), ("hackml2020/anonymous_1_bd_weights.h5", 1.0),
                      ("hackml2020/anonymous_1_bd_weights.h5", 255.0), ("hackml2020/sunglasses_bd_weights.h5", 255.0)):
    _, params = load_keras(asset(f"models/{name}"))
    feats, feats_xla = settling.pool3_64(params, x, divisor), settling.pool3_64_xla(params, x, divisor)
    worst = 0.0
    for mask in prefix_masks(np.argsort(feats.mean(axis=(0, 1, 2)), kind="stable")).astype(np.float64):
        want, scale = numpy_ref.head(params, feats, mask), numpy_ref.output_scale(params, feats, mask)
        worst = max(worst, float((np.abs(numpy_ref.head(params, feats_xla, mask) - want).max(axis=1) / scale).max()))
    print(f"tie64 {name} /{divisor:g}: {worst / settling.U64:.2f} u64 S (a tenth of the bound: "
          f"{settling.TIE64_RTOL / 2 / 10 / settling.U64:.0f})")
EOF

# Where the float64 settling's time goes (16 ms of the whole curve on the H200, for 150 predictions): the
# settling functions profiled over one warm sweep of the two validation sets, images on the device.
step 30 settle_profile python3 - "$lab" <<'EOF'
import cProfile, pstats, sys
import jax
from badnet_jax import load_lab_h5
from badnet_jax.io.model_file import load_model
import badnet_jax.sweep.run as run
lab = sys.argv[1]
model, params = load_model(f"{lab}/models/bd_weights.h5", "raw")
sets = {name: jax.device_put(load_lab_h5(f"{lab}/data/{path}", keep_uint8=True)[0])
        for name, path in (("clean_valid", "cl/valid.h5"), ("bd_valid", "bd/bd_valid.h5"))}
for _ in range(2):
    print(run.rank_and_sweep(model, params, sets).seconds)
profile = cProfile.Profile()
def profiled(fn):
    def call(*args, **kwargs):
        profile.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            profile.disable()
    return call
run.settle, run.settle_ranking = profiled(run.settle), profiled(run.settle_ranking)
print(run.rank_and_sweep(model, params, sets).seconds)
pstats.Stats(profile, stream=sys.stdout).sort_stats("cumulative").print_stats(25)
EOF

# Correctness on the device (each GPU compile takes seconds, so a selection): the device-marked kernel test
# (kernel = reference at 61 x 4096 x 1283, the probe at real shapes), the batched sweep with either head
# against the plain sweep on the real B and faces, the boundary images against float64 at every step, the XLA
# float64 trunk against the NumPy network (and TIE64_RTOL / RANK64_RTOL against their difference there), the
# float64 calls' sizes and weights, orders vmapped in groups against each order alone, and the convolution's
# width-blocked forms (DeepID's conv_1 at every block size, the bias, jit and vmap).
step 150 tests python3 -m pytest -q -p no:cacheprovider tests/kernels tests/sweep tests/numerics -k "on_device or \
  (real_b and not batchNone) or fast_float64 or float64_precision or two_float64 or float64_channel_means or \
  test_xla64 or covers_the_float64 or \
  (float64_answer_at_every_step and (grouped or batched)) or orders_vmapped or \
  (test_conv2d.py and (55x47 or bias or vmap))"
grep -E "passed|failed|error" "$log" | tail -2

# The whole defense end to end on the stand-in files with the lab's ranking (its table is the CPU's).
prune="$PWD/scripts/prune.py"
step 40 prune bash -c "cd $lab && time python3 $prune --drop 0.02,0.04,0.10,0.30 --nocheckpoints --out_dir results1"
cp "$lab/results1/curve.json" "$out/curve.json" 2>/dev/null

echo "----- summary"
grep -h -E "^machine:|^(conv_[0-9]|fc_[0-9]|output|trunk|head) +(trunk|affine|tail|head) |^impl |^(reference|pallas) +[0-9]+ |\
^grid of|grid [0-9]+/|conv_1 form|^tie64 |^\{'device'|settling.py|reference +[0-9.]+ s|pallas_block_n[0-9]+|^matmul_peak|^=====.*rc=|^real|passed|failed" "$log" \
  | cut -c1-220
