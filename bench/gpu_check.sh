#!/usr/bin/env bash
# Everything a lent GPU session checks, in one device call (about 8 minutes on an H200):
#   1. tests/test_gpu.py: CUDA graphs, fused projections and torch.compile against transformers;
#   2. bench/bench_generate.py at batch 256 and 512, bf16, compiled, transformers at 256 (the issue's
#      target), with a kernel profile of one batch-512 call;
#   3. where Ray is carried (.ray-bundle/, from ../shared/tools/ray-bundle.sh), bench/bench_pipeline.py:
#      images/s per GPU end to end against the model alone, git-base shape, batch 256.
# The GPU image's transformers (5.17) has a GIT bug; carry 5.24 as a wheel in .whl/ (see README, Performance).
# Run it as:  run(command="bash bench/gpu_check.sh", carry=[".whl", ".ray-bundle"], timeout_s=600)
# Logs land in $OUT (or ./out) so they come back whole; each step's table is printed last.
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out" /tmp/site
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log" | tail -n 15

timeout 300 python3 bench/bench_generate.py --device cuda --batch-sizes 256 512 --reference-batch-sizes 256 \
    --repeats 2 --compile --profile 2>&1 | tee "$out/bench_generate.log" | grep -v "^Writing model shards"

if [ -f .ray-bundle/ray-slim.tar.xz ]; then
    tar xJf .ray-bundle/ray-slim.tar.xz -C /tmp/site &&
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .ray-bundle/wheels/*.whl &&
        timeout 170 python3 bench/bench_pipeline.py --model git-base --gpus-per-worker 1 --batch-size 256 \
            --images 8192 --shard-size 512 --rounds 2 --skip memory redo --baseline-threads 1 \
            --pipeline-cpus-per-worker 1 2>&1 | tee "$out/bench_pipeline.log" | grep -E "^round|^efficiency"
fi
