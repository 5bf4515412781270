#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the workplace's `device` tool runs it from the repo
# root, with $OUT collected afterwards). Uses what that machine ships (torch, onnx, onnxruntime
# CPU, tqdm, click, pillow) plus, when PYTHONPATH brings them, onnxruntime-gpu and
# onnxconverter-common. TensorRT is absent there, so no engine runs.
#   1. the GPU-marked runner tests;
#   2. export (fp32 + fp16 ONNX), then `bench` of torch (fp32, fp16) and, with onnxruntime-gpu,
#      ort / ort-fp16 on the CUDA EP, batch 1/8/32;
#   3. `check` of ort and ort-fp16 on CUDA against the CPU fp32 reference;
#   4. tiled `infer` on CUDA over 24 synthetic photos plus one 6000x8000 photo.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/gpu-out}; W=/tmp/gpu-work; mkdir -p "$OUT" "$W"
py=python3; fcn="$py -m fcn_deploy"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
$py -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'ort', o.__version__, o.get_available_providers())" | tee -a "$OUT/gpu.txt"
$py -c "
import torch; from fcn_deploy.model import FCN, save_checkpoint
torch.manual_seed(0); save_checkpoint('$W/model.pt', FCN().eval())"
echo "== gpu tests"; timeout 100 $py -m pytest -q -p no:cacheprovider -m gpu tests/test_runners.py 2>&1 | tail -3
echo "== export"; timeout 60 $fcn export "$W/model.pt" -o "$W/export/fcn.onnx" --fp16 2>&1 | tail -4
bench() { timeout 60 $fcn bench --batch-sizes 1,8,32 --iterations 30 --max-seconds 4 --device cuda "$@" 2>&1 | tail -5; }
echo "== bench torch fp32"; bench --backend torch --model "$W/model.pt" --report "$OUT/bench-torch-fp32.json"
echo "== bench torch fp16"; bench --backend torch --model "$W/model.pt" --precision fp16 --report "$OUT/bench-torch-fp16.json"
if $py -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
  echo "== bench ort cuda"; bench --backend ort --model "$W/export/fcn.onnx" --report "$OUT/bench-ort-fp32.json"
  echo "== bench ort-fp16 cuda"; bench --backend ort-fp16 --model "$W/export/fcn.fp16.onnx" --report "$OUT/bench-ort-fp16.json"
  echo "== check ort, ort-fp16 on cuda"
  timeout 90 $fcn check --backend ort,ort-fp16 --model "$W/model.pt" --export-dir "$W/export" --engines-dir "$W/engines" \
    --device cuda --synthetic 8 --max-tiles 16 --report "$OUT/check-cuda.json" 2>&1 | tail -6
fi
echo "== infer torch cuda"
$fcn synth-voc "$W/data" --num-images 24 >/dev/null
$py -c "
import numpy as np; from PIL import Image
rng = np.random.default_rng(0); Image.fromarray(rng.integers(0, 255, (6000, 8000, 3), dtype=np.uint8)).save('$W/big 6000x8000.jpg', quality=90)"
mkdir -p "$W/photos"; cp "$W"/data/VOCdevkit/VOC2012/JPEGImages/*.jpg "$W/big 6000x8000.jpg" "$W/photos/"
timeout 100 $py -c "
import resource, sys
from fcn_deploy.cli import cli
try:
    cli(['infer', '$W/photos', '--backend', 'torch', '--model', '$W/model.pt', '--device', 'cuda', '--batch-size', '32', '-o', '$W/pred'])
except SystemExit as exc:
    print('exit', exc.code, 'max RSS MiB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
" 2>&1 | grep -vE "it/s|img/s" | tail -4 | tee "$OUT/infer-torch-cuda.txt"
