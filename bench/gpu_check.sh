#!/usr/bin/env bash
# Everything a lent GPU session checks, in one device call (about 6 minutes on an H200):
#   1. tests/test_gpu.py: CUDA graphs, fused projections and torch.compile against transformers;
#   2. bench/bench_generate.py at batch 256 and 512, bf16, compiled, transformers at 256 (the target),
#      with a kernel profile of one batch-512 call.
# The GPU image's transformers (5.17) has a GIT bug; carry 5.24 as a wheel in .whl/ (see README, Performance).
# Logs land in $OUT (or ./out) so they come back whole; the benchmark's table is printed last.
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_generation_steps.py 2>&1 \
    | tee "$out/test_gpu.log" | tail -n 15
timeout 420 python3 bench/bench_generate.py --device cuda --batch-sizes 256 512 --reference-batch-sizes 256 \
    --compile --profile "$@" 2>&1 | tee "$out/bench_generate.log" | grep -v "^Writing model shards"
