"""Train the FCN from a random-init trunk on a synthetic VOC-format set (not a test).

Writes ``--images`` synthetic images (3/4 train, 1/4 val), trains with ``fcn_deploy.train.train``
(whole-image validation after every epoch) and prints the validation mIoU per epoch and the
minutes taken. No ImageNet weights are used (there is no network here), so the numbers say how
fast the loop learns the synthetic textures, not what the chapter reaches on VOC.

    .venv/bin/python benchmarks/train_synthetic.py                 # ~5-8 min on 2 CPU cores
    .venv/bin/python benchmarks/train_synthetic.py --device cuda --crop 320x480 --images 96
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fcn_deploy.train import parse_hw, train
from fcn_deploy.voc import write_synthetic_voc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--crop", default="160x224")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.003,
                    help="chapter semantics: the loss is summed over the images of a batch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="keep the data and checkpoint here (default: temp)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        start = time.perf_counter()
        voc = write_synthetic_voc(work / "data", num_images=args.images, seed=args.seed, force=True)
        synth_s = time.perf_counter() - start
        start = time.perf_counter()
        history = train(voc, work / "model.pt", epochs=args.epochs, lr=args.lr,
                        batch_size=args.batch_size, crop_hw=parse_hw(args.crop), device=args.device,
                        num_workers=args.num_workers, seed=args.seed, force=True, progress=sys.stderr.isatty())
        minutes = (time.perf_counter() - start) / 60

    print(f"synthetic set: {args.images} images in {synth_s:.1f} s; crop {args.crop}, batch "
          f"{args.batch_size}, lr {args.lr}, device {args.device}, random-init trunk")
    print("epoch  train_loss  train_acc  val_acc  val_mIoU  img/s  train_s  val_s")
    for e in history:
        print(f"{e['epoch']:5d}  {e['train_loss']:10.4f}  {e['train_pixel_acc']:9.3f}  "
              f"{e['val_pixel_acc']:7.3f}  {e['val_miou']:8.3f}  {e['images_per_s']:5.1f}  "
              f"{e['train_seconds']:7.1f}  {e['val_seconds']:5.1f}")
    best = max(e["val_miou"] for e in history)
    print(f"final val mIoU {history[-1]['val_miou']:.3f} (best {best:.3f}) after "
          f"{len(history)} epochs in {minutes:.2f} min")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "minutes": minutes, "history": history}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
