"""Tiled vs whole-image agreement with a *trained* model (random weights understate it, see
``tiling_overlap.py``): 640x960 mosaics of four synthetic VOC photos, shifted so tile borders
do not fall on the mosaic seams, segmented whole by PyTorch and tiled by the Segmenter.

    .venv/bin/python benchmarks/tiling_trained.py demo-work/model.pt demo-work/data/VOCdevkit/VOC2012

Measured 2026-11-26 on the model ``make demo`` trains (validation mIoU 0.66): overlap 0,
uniform: 99.68% / 99.55%; overlap 128, hann (the defaults): 99.92% / 99.88% (two mosaics).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fcn_deploy.images import normalize
from fcn_deploy.infer.segmenter import Segmenter
from fcn_deploy.model import load_checkpoint
from fcn_deploy.runners.torch_runner import TorchRunner
from fcn_deploy.defaults import IMAGENET_MEAN, IMAGENET_STD
from fcn_deploy.voc import list_split, read_sample


def mosaics(voc_root: str, count: int) -> list[np.ndarray]:
    photos = [read_sample(s)[0] for s in list_split(voc_root, "trainval")]
    photos = [p[:320, :480] for p in photos if p.shape[0] >= 320 and p.shape[1] >= 480]
    out = []
    for k in range(0, min(count * 4, len(photos) - 3), 4):
        top, bottom = np.concatenate(photos[k:k + 2], 1), np.concatenate(photos[k + 2:k + 4], 1)
        out.append(np.roll(np.concatenate([top, bottom], 0), (100, 150), (0, 1)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("voc_root")
    ap.add_argument("--mosaics", type=int, default=2)
    args = ap.parse_args()
    model, _ = load_checkpoint(args.checkpoint)
    with TorchRunner(args.checkpoint) as runner:
        for i, img in enumerate(mosaics(args.voc_root, args.mosaics)):
            with torch.inference_mode():
                x = torch.from_numpy(normalize(img, IMAGENET_MEAN, IMAGENET_STD))[None]
                whole = model(x).argmax(1)[0].numpy()
            for overlap, window in ((0, "uniform"), (128, "hann")):
                tiled = Segmenter(runner, batch_size=4, overlap=overlap, window=window).predict(img)
                print(f"mosaic {i}: overlap {overlap:3d} {window:7s} agreement {(tiled == whole).mean() * 100:.2f}%")


if __name__ == "__main__":
    main()
