#!/usr/bin/env bash
# The one prepared GPU check: on the GPU machine (no package registry there), build lckv._C against
# the torch it has (with the CUDA kernels), run the cuda-marked tests, then benchmarks/gpu_check.py
# (every Triton and CUDA kernel compiled, against the reference ops, and a speed table with one
# decode step of `retrieval` vs sdpa at 128K tokens). Everything lands under $OUT (default
# benchmarks/results): gpu_env.txt, build.log, pytest_cuda.log, gpu_check.json. Budget: < 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with a GPU
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/benchmarks/results}"
mkdir -p "$OUT"
cd "$REPO"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
step() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }

step "environment"
{ nvidia-smi -L; python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
    2>&1 | tee "$OUT/gpu_env.txt"

step "building lckv._C against this torch (log: build.log)"
if ! timeout 300 pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    step "BUILD FAILED: the CUDA kernels are not bound; the Triton checks still run"
fi
python -c "import lckv._C as c; print('CUDA kernels bound:', hasattr(c, 'flat_topk_scores_cuda'))" 2>&1 | tee -a "$OUT/gpu_env.txt"

step "cuda-marked tests (log: pytest_cuda.log)"
timeout 180 python -m pytest -q -p no:cacheprovider -m cuda tests/test_kernels_cuda.py > "$OUT/pytest_cuda.log" 2>&1
tail -5 "$OUT/pytest_cuda.log"

step "kernels vs references, speed table (gpu_check.json)"
timeout 240 python benchmarks/gpu_check.py --out "$OUT"
status=$?
step "done (exit $status)"
exit $status
