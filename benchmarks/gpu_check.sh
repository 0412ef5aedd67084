#!/usr/bin/env bash
# The GPU checks of the meta-step work (issue 12) as one command, for a lent GPU machine: its python3 (3.12) has torch
# with CUDA, pyarrow, pandas and pytest, but no Ray, no `higher`, no Fashion-MNIST, and no network.
#
# Here, once:   python benchmarks/pack_device.py      (writes .whl/, git-ignored: wheels, Ray as a tarball, data; 29 MiB)
# There:        bash benchmarks/gpu_check.sh "$OUT"    (the device tool: carry [".whl"], timeout_s 600)
#
# Stages, in this order unless STAGES names others: the CUDA-only tests (OUTDIR/gpu_tests.log); bench_step.py on CUDA
# for the quickstart (the reference, raydistill, 4 batched samples per task, bf16 and the compiled prefix:
# OUTDIR/step_gpu_quickstart.json);
# `share`, 4 Ray workers at 0.25 GPU each against 1 (bench_scaling.py --gpu-share: OUTDIR/scaling_gpu_share.json);
# then bench_step.py for ipc1, cifar100 and ipc10, one JSON each, so a run cut short keeps what finished. The log is
# OUTDIR/gpu_check.log. DEVICE=cpu STAGES="step:quickstart share" REPEATS=1 runs the same steps on a CPU (share on a
# logical GPU): a check of this script, not a figure.
set -u -o pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
device=${DEVICE:-cuda}
stages=${STAGES:-tests step:quickstart share step:ipc1 step:cifar100 step:ipc10}
repeats=${REPEATS:-5}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
mkdir -p /tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
fi
if compgen -G ".whl/ray-*.tar.xz" >/dev/null; then
    "$py" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall('/tmp/site', filter='data')" .whl/ray-*.tar.xz \
        || { echo "gpu_check: unpacking Ray failed" >&2; exit 1; }  # Python's lzma: the image may have no xz
fi
export PYTHONPATH="$PYTHONPATH:/tmp/site"
{
    date -u
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} 2>&1 | tee "$out/gpu_check.log"
status=0
for stage in $stages; do
    echo "== $stage on $device ($(date -u +%T))" | tee -a "$out/gpu_check.log"
    case $stage in
    tests)  # the tests that only run with CUDA (skipped on CPU machines, CI included; the files import no Ray)
        "$py" -m pytest -q -p no:cacheprovider -k cuda tests/test_samples_per_task.py tests/test_augment.py 2>&1 \
            | tee "$out/gpu_tests.log" | tail -3 || status=1 ;;
    step:*)
        config=${stage#step:}
        "$py" benchmarks/bench_step.py --device "$device" --configs "$config" --repeats "$repeats" \
            --variants reference,raydistill,samples4,bf16,compile --out "$out/step_gpu_$config.json" 2>&1 \
            | grep -v '^{' | tee -a "$out/gpu_check.log" || status=1 ;;
    share)
        if ! "$py" -c "import ray" 2>/dev/null; then
            echo "gpu_check: share skipped, no Ray here (run benchmarks/pack_device.py and carry .whl)" \
                | tee -a "$out/gpu_check.log"
            status=1
            continue
        fi
        dry=()
        [ "$device" = cuda ] || dry=(--num-gpus 1 --num-cpus 4 --steps 4 --warmup 1)
        RAY_USAGE_STATS_ENABLED=0 "$py" benchmarks/bench_scaling.py --gpu-share --data-root "$PWD/.whl/fashion-mnist" \
            "${dry[@]}" --out "$out/scaling_gpu_share.json" 2>&1 | tee -a "$out/gpu_check.log" || status=1 ;;
    *)
        echo "gpu_check: unknown stage $stage (tests, step:CONFIG, share)" | tee -a "$out/gpu_check.log"
        status=1 ;;
    esac
done
echo "gpu_check: done ($(date -u +%T)), status $status" | tee -a "$out/gpu_check.log"
exit $status
