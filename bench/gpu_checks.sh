#!/usr/bin/env bash
# Issue 16's GPU figures in one command, for a machine with one CUDA GPU (an H100 or H200):
#   1. the GPU cluster tests (CUDA-IPC pools, UCX from GPU memory, exact outputs);
#   2. KV through the kvstore against a raw device copy and raw ucxx (cuda_ipc), 256 MiB;
#   3. TPOT through the router against the engine alone, Llama-3-8B shape in bfloat16, batch 64
#      (saves a 16 GB random-weight checkpoint first; the engine-only engine and both workers
#      hold the weights on the one GPU: ~60 GB with their KV pools).
# Results go to $OUT (default results/gpu-checks): run.log (everything printed), kv/ and
# serving-tpot.* (JSON, PNG), logs.tgz (the services' logs): six files, within what a device
# machine sends back. About 8 minutes on an H100.
#
# The device machines lack grpcio-tools and ucxx: carry the generated stubs (pdserve/) and the
# ucxx wheels for CUDA 13 in .whl/ (the developers' guide lists them), e.g. with the device tool:
#   run(command="bash bench/gpu_checks.sh", carry=["pdserve", ".whl"], timeout_s=600)
set -uo pipefail
OUT=${OUT:-results/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
exec > >(grep --line-buffered -v 'it/s\]$' | tee "$OUT/run.log") 2>&1  # (no progress-bar redraws)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
failed=0
step() {  # step NAME SECONDS COMMAND...: a time limit each, so that one hang leaves the others' figures
    local name=$1 limit=$2
    shift 2
    echo "== $name =="
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc =="
    [ "$rc" = 0 ] || failed=1
}
step gpu-tests 120 python3 -m pytest -q -x tests/e2e/test_gpu_cluster.py
step kv-throughput 90 python3 -m bench.kv_throughput --device cuda --mib 256 --rounds 5 --out "$OUT/kv"
step serving-tpot 330 python3 -m bench.serving_tpot --model llama-3-8b --device cuda:0 --rounds 3 \
    --out "$OUT/serving-tpot"
tar czf "$OUT/logs.tgz" -C "$OUT" kv/logs serving-tpot-logs 2>/dev/null && rm -rf "$OUT/kv/logs" "$OUT/serving-tpot-logs"
exit $failed
