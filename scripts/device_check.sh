#!/usr/bin/env bash
# One-shot GPU/TPU check for a lent device (see BUILD_NOTES.md): correctness first, then timings.
# Run from the repository root on the device machine; writes JSON and logs under ${OUT:-results/device}.
set -uo pipefail
out="${OUT:-results/device}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$out/devices.txt"
# Device-marked kernel tests and the exactness tests of the sweep (need ../shared/assets or BADNET_ASSETS).
python3 -m pytest -q -x kernels tests/test_sweep.py tests/test_prefix.py -p no:cacheprovider 2>&1 | tail -5 | tee "$out/tests.txt"
for impl in pallas reference; do
  python3 scripts/benchmark.py --impl "$impl" --repeats 5 --out "$out/bench_$impl.json" 2>&1 | tail -40 > "$out/bench_$impl.txt"
done
tail -n 12 "$out"/bench_*.txt
