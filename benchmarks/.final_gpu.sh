# one device call: every CUDA test, then the figures (overlay, detectors, depth, raft)
set -u
export OUT=${OUT:-$PWD/perf_out}
mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
printf '#!/bin/sh\nPYTHONPATH=%s exec %s "$@"\n' "$PYTHONPATH" "$(command -v python3)" > /tmp/dlserver_python
chmod +x /tmp/dlserver_python; export DLSERVER_PYTHON=/tmp/dlserver_python
T0=$(date +%s)
timeout 200 python3 -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_mask_rcnn.py tests/test_densepose.py tests/test_gpu_io.py tests/test_detection.py tests/test_overlay_drawing.py tests/test_depth_anything_v2.py tests/test_raft.py > $OUT/pytest_cuda.log 2>&1; echo "pytest rc=$? $(( $(date +%s)-T0 ))s"; tail -25 $OUT/pytest_cuda.log
timeout 90 python3 benchmarks/bench_overlay.py --device cuda --models mask_rcnn densepose --precisions fp16 --repeat 5 --json $OUT/overlay.json > $OUT/overlay.log 2>&1; echo "overlay rc=$? $(( $(date +%s)-T0 ))s"; tail -30 $OUT/overlay.log
timeout 60 python3 benchmarks/bench_models.py --device cuda --sizes 1080p --models mask_rcnn densepose --modes matte --densepose-people 10 100 --repeat 5 --skip-checks --batches 1 2 4 --json $OUT/models.json > $OUT/models.log 2>&1; echo "models rc=$? $(( $(date +%s)-T0 ))s"; tail -30 $OUT/models.log
timeout 50 python3 benchmarks/bench_depth.py --device cuda --frames 10 --json $OUT/depth.json > $OUT/depth.log 2>&1; echo "depth rc=$? $(( $(date +%s)-T0 ))s"; tail -15 $OUT/depth.log
timeout 50 python3 benchmarks/bench_raft.py --device cuda --repeat 4 --json $OUT/raft.json > $OUT/raft.log 2>&1; echo "raft rc=$? $(( $(date +%s)-T0 ))s"; tail -15 $OUT/raft.log
