#!/usr/bin/env bash
# Issue 16's GPU figures in one command, for a machine with one CUDA GPU (an H100 or H200):
#   serving-tpot   TPOT through the router against the engine alone, Llama-3-8B shape in bfloat16,
#                  batch 64 (saves a 16 GB random-weight checkpoint first; the engine-only engine and
#                  both workers each hold the weights on the one GPU: ~65 GB with their KV pools)
#   kv-throughput  KV through the kvstore against a raw device copy and raw ucxx (cuda_ipc), 256 MiB
#   gpu-tests      the GPU cluster tests (CUDA-IPC pools, UCX from GPU memory, exact outputs)
# in that order, or only those named: `bash bench/gpu_checks.sh kv-throughput`. Each has a time
# limit, 560 s in all; not yet run on a GPU, so how long each takes there is an estimate.
# Results go to $OUT (default results/gpu-checks): run.log (everything printed), serving-tpot.json
# and .png (rewritten after every round), kv/kv-throughput.json and .png, logs.tgz (the services'
# logs): at most six files, within what a lent machine sends back.
#
# The device machines lack grpcio-tools, ucxx, and gRPC's health and reflection packages (the script
# checks for them first): carry the generated stubs (pdserve/, made by `make protos`) and wheels in
# .whl/ (git-ignored), fetched here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     -d .whl ucxx-cu13==0.52.* libucxx-cu13==0.52.* 'libucx-cu13>=1.21,<1.22' rmm-cu13==26.10.* \
#     librmm-cu13==26.10.* rapids-logger==0.3.* grpcio-health-checking==V grpcio-reflection==V
# (V: the machine's grpcio version, or older: their stubs refuse an older grpcio; the ucxx ones
# came to 51 MB on 2026-12-08, and the repo's files to 7 MB, within the 64 MiB a call carries), and run it with
# the device tool: run(command="bash bench/gpu_checks.sh", carry=["pdserve", ".whl"]).
set -uo pipefail
OUT=${OUT:-results/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
exec > >(tee "$OUT/run.log") 2>&1
log_writer=$!
finish() {  # the log's last lines reach the file before the script ends
    exec >&- 2>&-
    wait "$log_writer" 2>/dev/null
}
trap finish EXIT
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
python3 -c "import grpc_health, grpc_reflection, prometheus_client, uvloop, ucxx, pdserve.v1.router_pb2" || {
    echo "missing packages (above): carry them as wheels in .whl/, and the stubs in pdserve/"
    exit 1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
failed=0
step() {  # step NAME SECONDS COMMAND...: a time limit each, so that one hang leaves the others' figures
    local name=$1 limit=$2
    shift 2
    if [ -z "$wanted" ] || [[ " $wanted " == *" $name "* ]]; then
        echo "== $name ($(date +%T)) =="
        timeout --kill-after=10 "$limit" "$@"
        local rc=$?
        echo "== $name: exit $rc ($(date +%T)) =="
        [ "$rc" = 0 ] || failed=1
    fi
}
wanted="$*"
step serving-tpot 330 python3 -m bench.serving_tpot --model llama-3-8b --device cuda:0 --rounds 3 \
    --out "$OUT/serving-tpot"
step kv-throughput 100 python3 -m bench.kv_throughput --device cuda --mib 256 --rounds 5 --out "$OUT/kv"
step gpu-tests 130 python3 -m pytest -q -x tests/e2e/test_gpu_cluster.py
logs=()
for path in kv/logs serving-tpot-logs; do
    [ -e "$OUT/$path" ] && logs+=("$path")
done
if [ "${#logs[@]}" -gt 0 ]; then
    tar czf "$OUT/logs.tgz" -C "$OUT" "${logs[@]}"
    for path in "${logs[@]}"; do rm -rf "${OUT:?}/$path"; done
fi
exit $failed
