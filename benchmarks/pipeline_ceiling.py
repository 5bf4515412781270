"""The ceiling of ``infer``: the whole pipeline with an engine that costs nothing.

A :class:`NullRunner` answers every batch with the same random logits (made once per batch
size, on the runner's device; no model runs), so what is timed is everything around the engine:
reading and decoding the photos, cutting and normalising tiles, averaging and argmax on the
assembler's device, downloading labels, encoding and writing masks. ``infer`` with a real engine
cannot be faster than this; when the ceiling is below the engine's own tiles/s, the host side
(or the assembler) is what to work on, not the engine.

* On CUDA (``--device cuda``) it is the host-bound ceiling of a photo set on that machine.
* On the CPU with tiny tiles (``--tile 32x48`` and photos of a few tiles each), the device work
  almost vanishes and what is left is the pipeline's own cost per photo (Python, file I/O): a
  CPU proxy for the host side of the GPU pipeline, comparable between commits on one machine.

    python benchmarks/pipeline_ceiling.py PHOTOS [--device cuda] [--decode gpu] [--batch 32]
    python benchmarks/pipeline_ceiling.py --synthetic 1024x37x50 --tile 32x48 --decode gpu

Prints, per round, seconds, tiles/s, images/s, ms per photo and the seconds per stage summed
over threads (``InferSummary.stages``); ``--report FILE`` writes the best round as JSON.
The first round is a warm-up (imports, index maps, allocator) and is not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fcn_deploy.infer.pipeline import run_inference  # noqa: E402
from fcn_deploy.runners.base import Runner, TensorSpec  # noqa: E402


class NullRunner(Runner):
    """A benchmark instrument, not a backend: (N, C, th, tw) float32 logits that are the same
    random values for every call of a batch size, on ``device``, at no cost per call."""

    name = "null"

    def __init__(self, device: str = "cpu", tile_hw: tuple[int, int] = (320, 480), num_classes: int = 21) -> None:
        super().__init__()
        self.device = "cuda:0" if device == "cuda" else device  # as the real runners name it
        self.num_classes = num_classes
        self.input_spec = TensorSpec("image", (-1, 3, *tile_hw), "float32")
        self.meta = {"classes": [f"class{i}" for i in range(num_classes)], "tile_hw": list(tile_hw)}
        self._out: dict[int, object] = {}

    def _activate(self) -> None:
        pass

    def _deactivate(self) -> None:
        self._out.clear()

    def _logits(self, n: int):
        import torch

        if n not in self._out:
            gen = torch.Generator().manual_seed(n)
            th, tw = self.input_spec.shape[2:]
            self._out[n] = torch.randn((n, self.num_classes, th, tw), generator=gen).to(self.device)
        return self._out[n]

    def _infer_tensor(self, tiles, output):
        logits = self._logits(len(tiles))
        return logits.argmax(1).byte() if output == "labels" else logits

    def _infer(self, tiles: np.ndarray, output):
        result = self._logits(len(tiles))
        return (result.argmax(1).byte() if output == "labels" else result).cpu().numpy()


def synthetic_photos(folder: Path, count: int, h: int, w: int) -> Path:
    """``count`` JPEGs of (h, w): blurred random colours, one photo saved under ``count`` names."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    data = Path(folder / "p0000.jpg")
    Image.fromarray(coarse).resize((w, h), Image.BILINEAR).save(data, quality=90)
    raw = data.read_bytes()
    for i in range(1, count):
        (folder / f"p{i:04d}.jpg").write_bytes(raw)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", nargs="?", help="a folder of photos (or use --synthetic)")
    parser.add_argument("--synthetic", metavar="NxHxW", help="make N JPEGs of HxW in a temporary folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (where the null logits live)")
    parser.add_argument("--decode", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--assembler", default="auto", choices=["auto", "numpy", "torch"],
                        help="auto: numpy on the CPU, torch on CUDA (--decode gpu needs torch)")
    parser.add_argument("--tile", default="320x480", help="tile HxW of the null model")
    parser.add_argument("--overlap", type=int, default=None, help="default: min(96, tile height // 4)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds after one warm-up round")
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    th, tw = (int(v) for v in args.tile.split("x"))
    overlap = args.overlap if args.overlap is not None else min(96, th // 4)
    assembler = "torch" if args.decode == "gpu" and args.assembler == "auto" else args.assembler
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            n, h, w = (int(v) for v in args.synthetic.split("x"))
            photos = synthetic_photos(Path(tmp) / "photos", n, h, w)
        elif args.photos:
            photos = Path(args.photos)
        else:
            parser.error("give a photo folder or --synthetic NxHxW")
        runner = NullRunner(args.device, (th, tw))
        rounds = []
        with runner:
            for r in range(args.rounds + 1):
                summary = run_inference([photos], Path(tmp) / f"out{r}", runner=runner, batch_size=args.batch,
                                        overlap=overlap, progress=False, assembler=assembler, decode=args.decode)
                if summary.failed:
                    raise SystemExit(f"failed: {summary.failed[:3]}")
                row = {"round": r, "seconds": round(summary.seconds, 4), "images": summary.images,
                       "tiles": summary.tiles, "tiles_per_s": round(summary.tiles_per_s, 1),
                       "images_per_s": round(summary.images_per_s, 1),
                       "ms_per_image": round(summary.seconds / summary.images * 1e3, 3),
                       "first_batch_s": round(summary.first_batch_s, 4), "drain_s": round(summary.drain_s, 4),
                       "stages": summary.stages}
                print(("warm-up " if r == 0 else "round   ") + json.dumps(row), flush=True)
                if r:
                    rounds.append(row)
    best = min(rounds, key=lambda row: row["seconds"])
    print(f"ceiling: {best['tiles_per_s']:.0f} tiles/s, {best['images_per_s']:.0f} images/s, "
          f"{best['ms_per_image']:.3f} ms per image ({best['images']} images, {best['tiles']} tiles, "
          f"device {args.device}, decode {args.decode}, assembler {assembler}, tile {th}x{tw}, batch {args.batch}; "
          f"best of {len(rounds)} rounds: {', '.join(str(r['seconds']) for r in rounds)} s)")
    if args.report:
        args.report.write_text(json.dumps({"args": vars(args) | {"report": str(args.report)}, "best": best,
                                           "rounds": rounds, "started": time.strftime("%Y-%m-%d %H:%M:%S")},
                                          indent=1, default=str))


if __name__ == "__main__":
    main()
