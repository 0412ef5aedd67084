#!/usr/bin/env bash
# A GPU self-check: run it on your own card to see that raydistill's CUDA paths work there and what they measure.
#
#     bash scripts/gpu_selfcheck.sh OUTDIR               # from the checkout, with raydistill's dependencies installed
#
# What it checks and prints, stage by stage (STAGES picks others; the default runs them all, in this order):
#   tests           the tests that only run with CUDA (skipped on CPU-only machines); log in OUTDIR/gpu_tests.log
#   step:quickstart bench_step.py on CUDA for the quickstart config: the official `higher`-based reference,
#                   raydistill, 4 batched samples per task, bf16 and the compiled prefix (seconds per meta-step and
#                   peak GPU memory above the step's start): OUTDIR/step_gpu_quickstart.json
#   share           4 Ray workers at 0.25 GPU each against 1 worker on the whole GPU (bench_scaling.py --gpu-share):
#                   OUTDIR/scaling_gpu_share.json
#   step:ipc1, step:cifar100, step:ipc10   bench_step.py on the CIFAR-shaped configs, one JSON each
# Each stage writes its own file, so a run cut short keeps what finished. First the script prints the date, the GPUs
# (nvidia-smi -L), torch's version and whether it sees CUDA; everything printed is also in OUTDIR/gpu_selfcheck.log. It
# exits 0 when every stage passed.
#
# On a GPU node without internet access, build the bundle first on a machine that has it
# (python scripts/offline_bundle.py writes .whl/: wheels, Ray as a tarball, a Fashion-MNIST head; about 29 MiB)
# and copy the checkout with .whl/ to the node: this script installs the bundle into /tmp/site before it starts.
# DEVICE=cpu STAGES="step:quickstart share" REPEATS=1 runs the same steps on a CPU (share on a logical GPU): a check
# of this script, not a figure. PYTHON picks the interpreter (default python3), REPEATS the rounds per step (5).
set -u -o pipefail
out=${1:?usage: bash scripts/gpu_selfcheck.sh OUTDIR}
device=${DEVICE:-cuda}
stages=${STAGES:-tests step:quickstart share step:ipc1 step:cifar100 step:ipc10}
repeats=${REPEATS:-5}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
mkdir -p /tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_selfcheck: installing the bundled wheels from .whl/ failed" >&2; exit 1; }
fi
if compgen -G ".whl/ray-*.tar.xz" >/dev/null; then
    "$py" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall('/tmp/site', filter='data')" .whl/ray-*.tar.xz \
        || { echo "gpu_selfcheck: unpacking Ray from .whl/ failed" >&2; exit 1; }  # Python's lzma: the image may have no xz
fi
export PYTHONPATH="$PYTHONPATH:/tmp/site"
{
    date -u
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} 2>&1 | tee "$out/gpu_selfcheck.log"
status=0
for stage in $stages; do
    echo "== $stage on $device ($(date -u +%T))" | tee -a "$out/gpu_selfcheck.log"
    case $stage in
    tests)  # the tests that only run with CUDA (skipped on CPU machines, CI included; the files import no Ray)
        mapfile -t files < <(find tests/unit -name test_samples_per_task.py -o -name test_augment.py | sort)
        if [ ${#files[@]} -eq 0 ]; then
            echo "gpu_selfcheck: tests skipped, no test_samples_per_task.py or test_augment.py under tests/unit/" \
                | tee -a "$out/gpu_selfcheck.log"
            status=1
            continue
        fi
        "$py" -m pytest -q -p no:cacheprovider -k cuda "${files[@]}" 2>&1 \
            | tee "$out/gpu_tests.log" | tail -3 || status=1 ;;
    step:*)
        config=${stage#step:}
        "$py" benchmarks/bench_step.py --device "$device" --configs "$config" --repeats "$repeats" \
            --variants reference,raydistill,samples4,bf16,compile --out "$out/step_gpu_$config.json" 2>&1 \
            | grep -v '^{' | tee -a "$out/gpu_selfcheck.log" || status=1 ;;
    share)
        if ! "$py" -c "import ray" 2>/dev/null; then
            echo "gpu_selfcheck: share skipped, no Ray here (install ray, or bundle it with scripts/offline_bundle.py)" \
                | tee -a "$out/gpu_selfcheck.log"
            status=1
            continue
        fi
        dry=()
        [ "$device" = cuda ] || dry=(--num-gpus 1 --num-cpus 4 --steps 4 --warmup 1)
        RAY_USAGE_STATS_ENABLED=0 "$py" benchmarks/bench_scaling.py --gpu-share --data-root "$PWD/.whl/fashion-mnist" \
            "${dry[@]}" --out "$out/scaling_gpu_share.json" 2>&1 | tee -a "$out/gpu_selfcheck.log" || status=1 ;;
    *)
        echo "gpu_selfcheck: unknown stage $stage (tests, step:CONFIG, share)" | tee -a "$out/gpu_selfcheck.log"
        status=1 ;;
    esac
done
echo "gpu_selfcheck: done ($(date -u +%T)), status $status" | tee -a "$out/gpu_selfcheck.log"
exit $status
