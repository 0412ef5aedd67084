#!/usr/bin/env bash
# The GPU checks of the meta-step work (issue 12) as one command, for a lent GPU machine: its python3 has torch with
# CUDA, pyarrow, pyyaml and pytest, but no Ray and no `higher` (nothing can be installed from the network there).
#
# Here, once:   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps -d .whl higher==0.2.1
# There:        bash benchmarks/gpu_check.sh "$OUT"        (the device tool: carry [".whl"], timeout_s 600)
#
# Writes OUTDIR/gpu_tests.log (the CUDA-only tests), OUTDIR/step_gpu_<config>.json (bench_step.py on CUDA: the
# reference, raydistill, 4 batched samples per task and bf16; one file per config, so a run cut short keeps what
# finished) and OUTDIR/gpu_check.log. The configs run smallest first. DEVICE=cpu CONFIGS=quickstart REPEATS=1 runs
# the same steps on a CPU (a check of this script, not a figure). Not covered: 4 Ray workers sharing the GPU
# (bench_scaling.py --gpu-share), since Ray's wheel (79 MB) is over the tool's 64 MiB carry limit.
set -u -o pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
device=${DEVICE:-cuda}
configs=${CONFIGS:-quickstart ipc1 cifar100 ipc10}
repeats=${REPEATS:-5}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
    date -u
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} 2>&1 | tee "$out/gpu_check.log"
status=0
# The tests that only run with CUDA (skipped on CPU machines, CI included; the files import no Ray).
"$py" -m pytest -q -p no:cacheprovider -k cuda tests/test_samples_per_task.py tests/test_augment.py 2>&1 \
    | tee "$out/gpu_tests.log" | tail -3 || status=1
for config in $configs; do
    echo "== bench_step $config on $device ($(date -u +%T))" | tee -a "$out/gpu_check.log"
    "$py" benchmarks/bench_step.py --device "$device" --configs "$config" --repeats "$repeats" \
        --variants reference,raydistill,samples4,bf16 --out "$out/step_gpu_$config.json" 2>&1 \
        | grep -v '^{' | tee -a "$out/gpu_check.log" || status=1
done
echo "gpu_check: done ($(date -u +%T)), status $status" | tee -a "$out/gpu_check.log"
exit $status
