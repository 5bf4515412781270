"""Measure how tiled inference agrees with a whole-image forward pass (PyTorch, CPU, float32).

Chooses ``fcn_deploy.tiling`` defaults: minimum overlap, window and its floor, origin
alignment, and the padding of images smaller than a tile; also prints how one interior tile
agrees with the whole image by distance to the tile's edge (the ceiling any stitching can reach). Uses a random-weight FCN (seeded) on synthetic images
with structure at several scales; prints argmax agreement (% of pixels) with the whole image.

    .venv/bin/python benchmarks/tiling_overlap.py [--sizes 640x960 960x1440] [--seeds 0 1]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fcn_deploy.images import normalize
from fcn_deploy.model import FCN
from fcn_deploy.tiling import DEFAULT_OVERLAP, Stitcher, extract_tile, pad_tile, plan_tiles
from fcn_deploy.defaults import IMAGENET_MEAN, IMAGENET_STD, TILE_HW


def synthetic_image(h: int, w: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8: smooth noise at three scales plus random rectangles and discs."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    for cell in (8, 32, 128):
        coarse = torch.from_numpy(rng.random((1, 3, h // cell + 2, w // cell + 2), dtype=np.float32))
        up = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        img += up[0].permute(1, 2, 0).numpy() / 3
    yy, xx = np.mgrid[:h, :w]
    for _ in range(max(4, h * w // 40000)):
        colour = rng.random(3)
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(10, max(11, min(h, w) // 4))
        if rng.random() < 0.5:
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = colour
        else:
            img[max(0, cy - r): cy + r, max(0, cx - r): cx + r] = colour
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@torch.no_grad()
def forward(model: torch.nn.Module, chw: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(np.ascontiguousarray(chw))[None])[0].numpy()


def tiled_labels(model, chw, overlap, window, floor, align, cache) -> np.ndarray:
    _, h, w = chw.shape
    grid = plan_tiles(h, w, TILE_HW, overlap, align)
    stitcher = Stitcher(grid, 21, window, floor=floor)
    for i in range(grid.count):
        key = grid.origin(i)
        if key not in cache:
            cache[key] = forward(model, extract_tile(chw, grid, i))
        stitcher.add(i, cache[key])
    return stitcher.labels()


def border_profile(model, chw, ref) -> list[float]:
    """Agreement of one interior tile with the whole image by distance to the tile's edge."""
    th, tw = TILE_HW
    y, x = 32 * ((chw.shape[1] - th) // 64), 32 * ((chw.shape[2] - tw) // 64)
    pred = forward(model, chw[:, y: y + th, x: x + tw]).argmax(0)
    yy, xx = np.mgrid[:th, :tw]
    dist = np.minimum(np.minimum(yy, th - 1 - yy), np.minimum(xx, tw - 1 - xx))
    same = pred == ref[y: y + th, x: x + tw]
    return [float(same[(dist >= lo) & (dist < lo + 32)].mean()) for lo in range(0, th // 2, 32)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["640x960", "960x1440"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--overlaps", nargs="+", type=int, default=[0, 64, 128, 192])
    args = ap.parse_args()
    configs = [("uniform", 1.0), ("hann", 0.1), ("hann", 0.01), ("hann", 0.001)]
    results: dict[tuple, list[float]] = {}
    tiles: dict[tuple, int] = {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = FCN().eval()
        for size in args.sizes:
            h, w = (int(v) for v in size.split("x"))
            chw = normalize(synthetic_image(h, w, seed), IMAGENET_MEAN, IMAGENET_STD)
            ref = forward(model, chw).argmax(0)
            results.setdefault(("interior tile vs distance to its edge (32 px bins)",), []).append(
                border_profile(model, chw, ref))
            cache: dict = {}
            for align in (32, 1):
                for overlap in args.overlaps if align == 32 else [DEFAULT_OVERLAP]:
                    tiles[(size, overlap)] = plan_tiles(h, w, TILE_HW, overlap).count
                    for window, floor in configs:
                        pred = tiled_labels(model, chw, overlap, window, floor, align, cache)
                        results.setdefault((f"align {align:2d} overlap {overlap:3d} {window} {floor}",), []).append(
                            float((pred == ref).mean()))
        # padding: images smaller than a tile, reference = the image alone (sides multiples of 32)
        for h, w in ((256, 384), (160, 224), (64, 96), (32, 32)):
            chw = normalize(synthetic_image(h, w, seed + 7), IMAGENET_MEAN, IMAGENET_STD)
            ref = forward(model, chw).argmax(0)
            for mode in ("constant", "reflect"):
                pred = forward(model, pad_tile(chw, TILE_HW, mode))[:, :h, :w].argmax(0)
                results.setdefault((f"pad {mode} {h}x{w}",), []).append(float((pred == ref).mean()))
    print("tiles per image:", tiles)
    print("argmax agreement with the whole image, % (mean, min over seeds x sizes)")
    for (name,), vals in results.items():
        arr = 100 * np.asarray(vals)
        if arr.ndim == 2:
            print(f"  {name}: " + " ".join(f"{v:.1f}" for v in arr.mean(0)))
        else:
            print(f"  {name:42s} {arr.mean():7.2f} {arr.min():7.2f}")


if __name__ == "__main__":
    main()
