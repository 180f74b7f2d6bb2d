#!/usr/bin/env bash
# The device check as one command: every CUDA test (Triton kernels compiled for the GPU, not interpreted)
# and the kernel benchmark, block-sparse attention against SDPA (FlashAttention on CUDA) at 8k-32k tokens.
# Run from the repository root on a machine with an NVIDIA GPU and torch + triton installed; it installs
# nothing (device machines are offline). Tables land in benchmarks/results/*_cuda.md.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. HF_HUB_OFFLINE=1
python -c "import torch; assert torch.cuda.is_available(), 'gpu_check needs a CUDA GPU'; \
print(torch.__version__, torch.cuda.get_device_name())"
python -m pytest -q -p no:cacheprovider tests/test_sparse_attention_kernels.py tests/test_kv_cache_kernels.py \
    tests/test_exit_gate_kernels.py tests/test_token_merge_kernels.py
python -m benchmarks.sparse_attention --parts attention --device cuda --lengths 8192 16384 32768 --repeats 10
