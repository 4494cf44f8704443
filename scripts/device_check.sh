#!/usr/bin/env bash
# One-shot GPU/TPU check for a lent device (see BUILD_NOTES.md): correctness first, then timings.
#
# The real assets are read from $BADNET_ASSETS (default ../shared/assets); on a machine that has only a copy
# of the repository, copy them beside it or into an ignored folder and point BADNET_ASSETS there.
# Everything goes to ${OUT:-results/device}/log.txt plus a few JSON files; each step has its own time limit,
# so one stuck step cannot stall the rest. About 8-9 minutes on an H200 (GPU compiles 5-10 s each,
# benchmarks ~1-2.5 min, prune 30 s).
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
step 60 versions bash -c 'nvidia-smi -L; python3 -c "import jax; print(jax.__version__, jax.devices())";
  python3 -m pip list 2>/dev/null | grep -i -E "^(jax|jaxlib|jax-cuda|flax|optax|orbax|h5py|numpy|absl) "'
grep -E "^[0-9]+\.[0-9]+|GPU|^(jax|flax|optax|numpy) " "$log" | head -12

# Correctness on the device, the checks a CPU cannot make (each GPU compile takes 5-10 s, so a selection):
# the device-marked kernel test (kernel = reference at 61 x 4096 x 1283, the probe at real shapes), the
# batched sweep with either head against the plain sweep on the real B and faces, the boundary images
# against float64 at every step, the XLA float64 trunk against the NumPy network, and orders vmapped in
# groups against each order alone.
step 240 tests python3 -m pytest -q -p no:cacheprovider tests/kernels tests/sweep tests/numerics -k "on_device or (real_b and not batchNone) or fast_float64 or float64_precision or \
  (float64_answer_at_every_step and (grouped or batched)) or orders_vmapped"
grep -E "passed|failed|error" "$log" | tail -3
# The convolution's forms on the device (the rule keeps XLA's there; the width-blocked one must still be exact):
# DeepID's conv_1 at every block size, the bias, jit and vmap (a selection: each GPU compile takes seconds).
step 60 conv2d python3 -m pytest -q -p no:cacheprovider tests/kernels/test_conv2d.py -k "55x47 or bias or vmap"
grep -E "passed|failed|error" "$log" | tail -1

# Lab-scale stand-in data from the real faces, with the lab's B (as in docs/benchmarks.md's CPU tables).
lab=/tmp/labscale
step 120 standin python3 scripts/make_standin.py --assets "$assets" --out_dir "$lab"
mkdir -p "$lab/models" && cp "$assets/models/lab3/bd_weights.h5" "$lab/models/"
files="--model $lab/models/bd_weights.h5 --clean_valid $lab/data/cl/valid.h5 --bd_valid $lab/data/bd/bd_valid.h5"
# Every benchmark run opens with the per-layer table (each layer's share of the measured peak). The fast sweep
# (reference head, the default), its time split between the device and the host's float64
# settling, the kernel alone against the reference at three block sizes, and five rankings in one sweep.
step 180 bench_reference_b8 python3 scripts/benchmark.py $files --impl reference --batch_steps 8 --per_step_steps 2 \
  --repeats 5 --kernel_block_n 16,32,64 --rank_by activation,clp,l1,random,anp --out "$out/bench_reference_b8.json"
# The five orders vmapped in one group (SweepOptions.orders_per_call): does it beat one after the other?
step 150 bench_orders5 python3 scripts/benchmark.py $files --impl reference --batch_steps 8 --per_step_steps 1 \
  --repeats 5 --rank_by activation,clp,l1,random,anp --orders_per_call 5 --out "$out/bench_orders5.json"
# The whole defense end to end on the stand-in files: the lab's ranking, then five rankings side by side.
prune="$PWD/scripts/prune.py"
step 150 prune bash -c "cd $lab && time python3 $prune --drop 0.02,0.04,0.10,0.30 --out_dir results1"
step 150 prune_rankings bash -c "cd $lab && time python3 $prune --drop 0.02,0.04,0.10,0.30 --nocheckpoints \
  --rank_by activation,clp,l1,random,anp --out_dir results5"
cp "$lab/results1/curve.json" "$out/curve.json" 2>/dev/null
cp "$lab/results5/curve.json" "$out/curve_rankings.json" 2>/dev/null

echo "----- summary"
grep -h -E "^machine:|^(conv_[0-9]|fc_[0-9]|output|trunk|head) +(trunk|affine|tail|head) |(forward|sweep_plain|sweep_fast|sweep, rankings|per-step loop|reference|pallas_block_n[0-9]+) +[0-9.]+ s|on the device|FLOP ratio|^fast sweep|^=====.*rc=|in one call|Loaded|^real|^head_evaluations|^matmul_peak|^impl |^batch_steps|^chunk " "$log" | cut -c1-220
