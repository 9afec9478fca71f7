#!/usr/bin/env bash
# The GPU checks of issue 8 as one prepared script, for a session that has a CUDA machine:
#   make venv && bash bench/gpu_checks.sh 2>&1 | tee gpu_checks.log
# (the Makefile installs a CUDA build of torch where nvidia-smi works). Prints, in this order:
#   1. bench/cicw_overhead.py: step times of CE/CIW/CICW/CICW-M, CPU MLP and CUDA PreAct ResNet-18;
#   2. bench/stream_train.py: PreAct ResNet-18 fed from Kafka vs from memory on CUDA (ratio);
#   3. bench/job_throughput.py --gpu: the whole job through Ray Train with NCCL vs in-memory.
# Record the output in BENCHMARKS.md with the machine's name.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then
    echo "gpu_checks: no CUDA device visible to torch" >&2
    exit 2
fi
# NCCL refuses two ranks on one GPU: as many workers as GPUs, at most 2.
WORKERS=$(( GPUS < 2 ? GPUS : 2 ))
nvidia-smi -L
echo "== 1. bench/cicw_overhead.py --skip-solver"
$PY bench/cicw_overhead.py --skip-solver
echo "== 2. bench/stream_train.py --model preact_resnet18 --device cuda"
$PY bench/stream_train.py --model preact_resnet18 --device cuda --records 20000 --rate 0
echo "== 3. bench/job_throughput.py --model preact_resnet18 --gpu --workers $WORKERS"
$PY bench/job_throughput.py --model preact_resnet18 --gpu --workers "$WORKERS" --records 20000 --repeats 3
