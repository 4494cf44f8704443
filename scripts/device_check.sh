#!/usr/bin/env bash
# One-shot GPU/TPU check for a lent device (see BUILD_NOTES.md): correctness first, then timings.
#
# The shared assets do not travel with the working tree; copy them into an ignored folder and carry it:
#   mkdir -p .device_assets && cp -r ../shared/assets/. .device_assets/ && echo .device_assets >> .git/info/exclude
#   run(command="BADNET_ASSETS=.device_assets OUT=$OUT bash scripts/device_check.sh", carry=[".device_assets"])
# Writes JSON and logs under ${OUT:-results/device}. Budget: about 6-8 minutes on an H200.
set -uo pipefail
out="${OUT:-results/device}"
assets="${BADNET_ASSETS:-../shared/assets}"
export BADNET_ASSETS="$assets"
mkdir -p "$out"
# kernels/ installs as badnet_jax.kernels (pyproject package-dir): an editable install maps it. The machine is
# offline, so no build isolation; if its setuptools cannot build, a link gives the same module layout.
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || {
  ln -sfn ../kernels badnet_jax/kernels; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$out/devices.txt"
# Device-marked kernel tests (the kernel against the reference at 61 x 4096 x 1283, the probe at real shapes)
# and the exactness tests of the sweep (need the shared assets).
python3 -m pytest -q -x tests/kernels tests/test_sweep.py tests/test_prefix.py -p no:cacheprovider 2>&1 | tail -5 | tee "$out/tests.txt"
# Which head the plan resolves to on this device at the defense's real shapes (a failed probe says why).
python3 -c "import logging; logging.basicConfig(); from badnet_jax.sweep import plan_sweep, SweepOptions; print(plan_sweep(SweepOptions()).describe())" 2>&1 | tee "$out/plan.txt"
# Lab-scale stand-in data from the real faces, with the lab's B (as in BUILD_NOTES' CPU tables).
lab=/tmp/labscale
python3 scripts/make_standin.py --assets "$assets" --out_dir "$lab" > "$out/standin.txt" 2>&1
mkdir -p "$lab/models" && cp "$assets/models/lab3/bd_weights.h5" "$lab/models/"
files="--model $lab/models/bd_weights.h5 --clean_valid $lab/data/cl/valid.h5 --bd_valid $lab/data/bd/bd_valid.h5"
# The fast sweep: Pallas vs reference head, distinct steps batched (8, the accelerator default) vs one per call.
# The first run also times the kernel alone at three block sizes (one head call: 8 masks x 4096 images).
for run in "pallas 8 16,32,64" "reference 8" "pallas 0"; do
  set -- $run
  python3 scripts/benchmark.py $files --impl "$1" --batch_steps "$2" --per_step_steps 6 --repeats 5 \
    ${3:+--kernel_block_n "$3"} --out "$out/bench_$1_b$2.json" 2>&1 | tail -50 > "$out/bench_$1_b$2.txt"
done
grep -H -E "sweep_fast_s |speedup_fast|matmul_peak|sweep_fast_gflops|head_evaluations|forward_images|^fast sweep" "$out"/bench_*.txt
# The whole defense end to end on the stand-in files.
( cd "$lab" && /usr/bin/time -v python3 "$OLDPWD/scripts/prune.py" --drop 0.02,0.04,0.10,0.30 ) > "$out/prune.txt" 2>&1
grep -E "one call|Loaded|Elapsed|Maximum resident" "$out/prune.txt"
