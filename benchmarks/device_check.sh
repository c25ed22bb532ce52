#!/usr/bin/env bash
# The GPU checks in one short run, for a session lent a GPU machine (the `device` tool; ~2-4 min):
#   1. the tests marked cuda: real CUDA graphs (ndot_core.engine.graph_step) against the eager step;
#   2. benchmarks/bench_gpu.py: eager against graphs per batch, and the streams one GPU follows.
# Needs python3 with a CUDA torch and pytest only: the engine's tests run without the service's
# conftest (no Redis, no web packages). Logs and results land in $OUT (default /tmp/ndot-device-check).
#
#   run(command="bash benchmarks/device_check.sh", timeout_s=420)
set -o pipefail
out=${OUT:-/tmp/ndot-device-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/tests"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
python3 -m pytest -q -m cuda --noconftest -p no:cacheprovider tests/test_graph_step.py 2>&1 | tee "$out/cuda_tests.log"
tests=$?
python3 benchmarks/bench_gpu.py --out "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.log"
bench=$?
echo "device_check: tests rc=$tests, bench_gpu rc=$bench"
exit $((tests != 0 || bench != 0))
