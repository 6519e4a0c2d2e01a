#!/usr/bin/env bash
# The whole GPU measurement of issue 5 in one go, on the lent device machine (or any
# CUDA box): model benchmarks, the CUDA tests of the model authors, the end-to-end
# sequence and the transport figures. Logs go to $OUT (default ./perf_out).
#
#   bash benchmarks/gpu_run.sh [quick|io|e2e|models|overlay|devices|detectors|depth|raft]
#       io: end to end and transport only; e2e: end to end (with --nuke) only;
#       models: model benchmarks and CUDA tests only;
#       overlay: overlay against matte (bench_overlay.py) and the drawing's CUDA test;
#       matte: Mask R-CNN matte fp16, fused union kernel against tensors, 1080p and 4K,
#       and the CUDA tests of the fused kernels (about a minute);
#       devices: one server over every GPU (--devices): 1 GPU vs 2, 200 1080p frames
#       (FRAMES=N and COUNTS=1,2,4 change that);
#       detectors: first result, 1080p detector figures with batches, CUDA tests
#       depth: depth_anything_v2 at 1080p, fp16 / CUDA graph vs fp32 eager, and its CUDA test
#       raft: RAFT at 1080p, the model's paths against eager torchvision (bench_raft.py)
#
# Needs torch/torchvision with CUDA, numpy, opencv, pytest; OpenEXR is installed from
# wheels in .whl/ when it is missing (the device machine has no network: carry .whl).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/perf_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import OpenEXR" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# the client starts the embedded server with $DLSERVER_PYTHON and drops PYTHONPATH from
# its environment: a small launcher puts it back
if [ -z "${DLSERVER_PYTHON:-}" ]; then
    cat > /tmp/dlserver_python <<LAUNCHER
#!/bin/sh
PYTHONPATH=$PYTHONPATH exec $(command -v python3) "\$@"
LAUNCHER
    chmod +x /tmp/dlserver_python
    export DLSERVER_PYTHON=/tmp/dlserver_python
fi
QUICK=${1:-}
MODELS_LOG=$OUT/bench_models.log
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, torchvision, numpy, cv2; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__, 'numpy', numpy.__version__, 'cv2', cv2.__version__)"
    nproc; df -h /dev/shm /tmp | tail -2
} > "$MODELS_LOG" 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%T))"
    timeout "$limit" "$@" >> "$OUT/$name.log" 2>&1
    echo "=== $name rc=$? ($(date -u +%T))"
    tail -n 40 "$OUT/$name.log"
}

if [ "$QUICK" = raft ]; then
    step bench_raft 280 python3 benchmarks/bench_raft.py --device cuda \
        --json "$OUT/bench_raft.json"
    exit 0
fi

if [ "$QUICK" = detectors ]; then
    # issue 13's detector figures in one call: the first result (in process and through
    # dlserver infer), 1080p per-frame costs with batches of 1/2/4, then the CUDA tests
    step bench_first_frame 60 python3 benchmarks/bench_first_frame.py --device cuda --half \
        --frames 8 --cli --json "$OUT/bench_first_frame.json"
    step bench_models 70 python3 benchmarks/bench_models.py --device cuda --sizes 1080p \
        --models mask_rcnn densepose --modes matte --densepose-people 10 100 --repeat 5 \
        --skip-checks --json "$OUT/bench_models.json"
    step pytest_cuda 120 python3 -m pytest -m cuda tests/test_mask_rcnn.py \
        tests/test_densepose.py tests/test_gpu_io.py tests/test_detection.py -s -rs \
        -p no:cacheprovider
    exit 0
fi
if [ "$QUICK" = devices ]; then
    step bench_devices 590 python3 benchmarks/bench_devices.py --frames "${FRAMES:-200}" \
        ${COUNTS:+--counts "$COUNTS"} --json "$OUT/bench_devices.json"
    exit 0
fi
if [ "$QUICK" = depth ]; then
    step bench_depth 300 python3 benchmarks/bench_depth.py --device cuda --frames 50 \
        --json "$OUT/bench_depth.json"
    step pytest_cuda_depth 200 python3 -m pytest -m cuda tests/test_depth_anything_v2.py \
        -s -rs -p no:cacheprovider
    exit 0
fi
if [ "$QUICK" = overlay ]; then
    step bench_overlay "${LIMIT:-300}" python3 benchmarks/bench_overlay.py --device cuda \
        ${OVERLAY_ARGS:-} --json "$OUT/bench_overlay.json"
    step pytest_cuda_overlay 120 python3 -m pytest -m cuda tests/test_overlay_drawing.py \
        -s -rs -p no:cacheprovider
    exit 0
fi
if [ "$QUICK" = matte ]; then
    step bench_matte 60 python3 benchmarks/bench_overlay.py --device cuda --models mask_rcnn \
        --precisions fp16 --matte-only --json "$OUT/bench_matte.json"
    step pytest_cuda_matte 60 python3 -m pytest -m cuda tests/test_overlay_drawing.py \
        -s -rs -p no:cacheprovider
    exit 0
fi
if [ "$QUICK" = io ] || [ "$QUICK" = e2e ]; then
    :  # the server's I/O path only: end to end and transport, below
elif [ "$QUICK" = quick ]; then
    step bench_models 240 python3 benchmarks/bench_models.py --device cuda --sizes 1080p \
        --models mask_rcnn densepose --profile --json "$OUT/bench_models.json"
else
    step bench_models 270 python3 benchmarks/bench_models.py --device cuda --profile \
        --json "$OUT/bench_models.json"
fi
[ "$QUICK" = io ] || [ "$QUICK" = e2e ] || step pytest_cuda 160 python3 -m pytest -m cuda tests/test_mask_rcnn.py tests/test_densepose.py tests/test_gpu_io.py \
    -s -rs -p no:cacheprovider
[ "$QUICK" = models ] && exit 0
step bench_end_to_end 480 python3 benchmarks/bench_end_to_end.py --device cuda --nuke \
    --json "$OUT/bench_end_to_end.json"
[ "$QUICK" = e2e ] && exit 0
step bench_transport 70 python3 benchmarks/bench_transport.py --repeat 10
