#!/usr/bin/env bash
# The GPU benchmarks in one call on a lent H100 (80 GB) or H200, each under its own time limit, about 9 minutes in
# all from a bare machine, compiling included:
#   1. train_step.py: XL/2 training step of dit_core against the official DiT code (facebookresearch/DiT's models.py,
#      the anchor of the peers' table), eager and compiled, then XL/2 sampling forward at batch 256, then S/2 B/2 L/2;
#      img/s, MFU against the device's dense bf16 datasheet peak and peak memory of each, host-sync check, SDPA kernel
#      (most important measurements first; what would end after its budget is skipped);
#   2. fid_throughput.py: the FID stage (DiT-XL/2 DDPM-250 and DDIM-25, SD-architecture VAE, InceptionV3), share of
#      its time in the DiT forward;
#   3. block_options.py: XL/2 training step and sampling forward with each block option (RoPE, SwiGLU, RMSNorm,
#      QK-norm, all four) against the official block, eager;
#   4. profile_step.py: time, FLOPs and bytes per kernel class of the compiled XL/2 training step (its compiled graph
#      comes from inductor's cache, filled by step 1).
# Every measurement is built, timed and freed one at a time (at most 67 GiB resident, XL/2 with all four block options;
# 52 GiB with the official block: upper bounds counted by tests/test_benchmarks_memory.py), and each result is written
# as soon as it exists, so a limit that cuts a script short loses nothing it measured.
# Results (JSON) and the log go to $OUT (the device tool's output folder) or benchmarks/results.
#
# The device image has torch but neither diffusers, torch-fidelity nor timm (the official models.py imports it), and
# reaches no network; bring them in .whl/, from the repo root:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 torch-fidelity==0.4.0 timm==1.0.31 \
#       importlib_metadata zipp
#   cp <a clone of facebookresearch/DiT>/models.py .whl/official_dit_models.py
# then run it with the device tool: command "bash benchmarks/gpu_suite.sh", carry [".whl"], timeout_s 600.
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
exec > >(tee "$out/gpu_suite.log") 2>&1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

bench() {
    local limit=$1
    shift
    echo "=== $* (limit ${limit} s)"
    timeout "$limit" python3 "$@"
    echo "=== exit $?"
}
bench 230 benchmarks/train_step.py --device cuda --rounds 3 --budget-s 205 --json "$out/train_step.json"
bench 130 benchmarks/fid_throughput.py --device cuda --json "$out/fid_throughput.json"
bench 90 benchmarks/block_options.py --device cuda --modes eager --steps 5 --rounds 2 --json "$out/block_options.json"
bench 70 benchmarks/profile_step.py --device cuda --compiled --json "$out/profile_step.json"
