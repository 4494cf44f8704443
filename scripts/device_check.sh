#!/usr/bin/env bash
# One-shot GPU/TPU check for a lent device (see BUILD_NOTES.md): correctness first, then timings.
# Run from the repository root on the device machine; writes JSON and logs under ${OUT:-results/device}.
# Budget: about 6-8 minutes on an H200 (the per-step baseline is timed on 6 steps and scaled).
set -uo pipefail
out="${OUT:-results/device}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$out/devices.txt"
# Device-marked kernel tests and the exactness tests of the sweep (need ../shared/assets or BADNET_ASSETS).
python3 -m pytest -q -x kernels tests/test_sweep.py tests/test_prefix.py -p no:cacheprovider 2>&1 | tail -5 | tee "$out/tests.txt"
# The fast sweep: Pallas vs reference head, distinct steps batched (8, the accelerator default) vs one per call.
for impl in pallas reference; do
  for batch in 8 0; do
    python3 scripts/benchmark.py --impl "$impl" --batch_steps "$batch" --baseline_steps 6 --repeats 5 \
      --out "$out/bench_${impl}_b${batch}.json" 2>&1 | tail -45 > "$out/bench_${impl}_b${batch}.txt"
  done
done
grep -H -E "sweep_fast_s |speedup_fast|matmul_peak|sweep_fast_gflops|head_evaluations" "$out"/bench_*.txt
