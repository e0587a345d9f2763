#!/usr/bin/env bash
# The NVIDIA GPU figures of docs/benchmarks.md, in one run (about 9 minutes on one H100, most of it
# in the turn-cost part, which compiles a prefill per history length).
#
# Usage, from the repo root on a machine whose python3 has JAX with CUDA and torch with CUDA:
#   bash benchmarks/gpu.sh [OUT_DIR]     # logs: OUT_DIR/*.txt (docs/benchmarks_h100/ holds one run's)
#
# Every part keeps going when another fails, so that one run returns whatever it could measure.
set -uo pipefail
out=${1:-/tmp/gpu_bench}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Both frameworks share the GPU in one process: JAX must not grab 75% of it up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# The CPU benchmarks' single-thread default (bench_decode.py) means nothing here.
export XLA_FLAGS=""

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__)"; } 2>&1 | tee "$out/device.txt"
# The train-step benchmark's setting (B 8 x S 256), for the tiny sizes and for Qwen3-0.6B's layers
# (at 8 x 1024 the 0.6b step without remat asks for 108 GiB: see docs/benchmarks.md).
python3 benchmarks/bench_train.py --part step peak --torch-device cuda --sizes 6m 27m \
  --batch 8 --seq 256 --repeats 10 --matmul 8192 2>&1 | tee "$out/train_6m_27m.txt"
python3 benchmarks/bench_train.py --part step peak --torch-device cuda --sizes 0.6b \
  --batch 8 --seq 256 --repeats 10 --matmul 8192 2>&1 | tee "$out/train_0.6b.txt"
python3 benchmarks/bench_decode.py --part decode --torch-device cuda --sizes 6m 27m 0.6b \
  --repeats 3 2>&1 | tee "$out/decode.txt"
python3 benchmarks/bench_decode.py --part turns --torch-device cuda --turn-sizes 27m \
  --window 2 2>&1 | tee "$out/turns.txt"
