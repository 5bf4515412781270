#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the workplace's `device` tool runs it from the repo
# root, with $OUT collected afterwards). It needs only what that machine ships (torch, onnx,
# onnxruntime CPU, tqdm, click, pillow); TensorRT and onnxruntime-gpu are absent there.
#   1. the GPU-marked tests of the runners;
#   2. `fcn-deploy bench` of the PyTorch runner on CUDA, fp32 and fp16, batch 1/8/32;
#   3. tiled `fcn-deploy infer` on CUDA over 24 synthetic photos plus one 6000x8000 photo.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/gpu-out}; W=/tmp/gpu-work; mkdir -p "$OUT" "$W"
py=python3
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
$py -c "import torch, onnxruntime, numpy; print('torch', torch.__version__, 'ort', onnxruntime.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/gpu.txt"
$py -c "
import torch; from fcn_deploy.model import FCN, save_checkpoint
torch.manual_seed(0); save_checkpoint('$W/model.pt', FCN().eval())"
echo "== gpu tests"; timeout 150 $py -m pytest -q -p no:cacheprovider -m gpu tests/test_runners.py 2>&1 | tail -4 | tee "$OUT/gpu-tests.txt"
for prec in fp32 fp16; do
  echo "== bench torch cuda $prec"
  timeout 90 $py -m fcn_deploy bench --backend torch --model "$W/model.pt" --device cuda --precision "$prec" \
    --batch-sizes 1,8,32 --iterations 50 --max-seconds 8 --report "$OUT/bench-torch-cuda-$prec.json" 2>&1 | tail -8
done
echo "== infer torch cuda"
$py -m fcn_deploy synth-voc "$W/data" --num-images 24 >/dev/null
$py -c "
import numpy as np; from PIL import Image
rng = np.random.default_rng(0); Image.fromarray(rng.integers(0, 255, (6000, 8000, 3), dtype=np.uint8)).save('$W/data/big 6000x8000.jpg', quality=90)"
mkdir -p "$W/photos"; cp "$W"/data/VOCdevkit/VOC2012/JPEGImages/*.jpg "$W/data/big 6000x8000.jpg" "$W/photos/"
timeout 120 $py -m fcn_deploy infer "$W/photos" --backend torch --model "$W/model.pt" --device cuda --batch-size 32 \
  -o "$W/pred" 2>&1 | tail -3 | tee "$OUT/infer-torch-cuda.txt"
