#!/usr/bin/env bash
# Issue 22's runs on one host with K GPUs, in one go (each step's log and JSON under OUT/):
#   1. bench/distributed.py: DDP, FSDP2 per block, the pipeline (1F1B, Interleaved1F1B, DualPipeV),
#      plain and mhc, on all K GPUs;
#   2. bench/pipeline.py on 2 GPUs: overlap off and on, with NVLink and again with peer-to-peer
#      disabled (NCCL_P2P_DISABLE=1: transfers through host memory, as between nodes).
# NVLink multicast stays off (the device notes).
#   bench/multi_gpu.sh K OUT [SECONDS_PER_RUN [BENCH ARGS...]]
#   bench/multi_gpu.sh 2 /tmp/multi 600 --device cpu --smoke     # gloo, tiny: a check of the script
set -uo pipefail
usage="usage: bench/multi_gpu.sh K OUT [SECONDS_PER_RUN [BENCH ARGS...]]"
gpus="${1:?$usage}"
out="$(realpath -m "${2:?$usage}")"
limit="${3:-900}"
shift $(( $# < 3 ? $# : 3 ))
cd "$(dirname "$0")"
mkdir -p "$out/distributed" "$out/pipeline_nvlink" "$out/pipeline_no_p2p"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
status=0
run() {  # name, then the command; a failed or timed-out run is reported and the others still run
    local name="$1"; shift 1
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc ($out/$name.log)"
    [[ $rc -eq 0 ]] || status=1
}
run distributed torchrun --nproc-per-node "$gpus" distributed.py --out "$out/distributed" "$@"
run pipeline_nvlink torchrun --nproc-per-node 2 pipeline.py --out "$out/pipeline_nvlink" "$@"
run pipeline_no_p2p env NCCL_P2P_DISABLE=1 torchrun --nproc-per-node 2 pipeline.py --out "$out/pipeline_no_p2p" "$@"
exit $status
