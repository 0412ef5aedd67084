"""Build the ImageNet stand-in: Fashion-MNIST as a JPEG image folder at 128 px RGB (no ImageNet on this machine).

    python scripts/make_fmnist_folder.py --out /tmp/fmnist128                       # 60k + 10k images, 128 px
    python scripts/make_fmnist_folder.py --out /tmp/fm-small --per-class 20 --size 32   # a small one for tests

It writes the ImageNet layout that `raydistill prepare` and `data.name: imagefolder` read:

    OUT/train/<class>/<NNNNN>.jpg     Fashion-MNIST's training split (6000 a class; --per-class N keeps the first N)
    OUT/val/<class>/<NNNNN>.jpg       its test split (1000 a class; --val-per-class M keeps the first M)
    OUT/stand-in.json                 what was built (the arguments, the counts); written last

The full set has ImageNette's class count (10) and resolution (128 px), and six times its size. Class folders are
`00-t-shirt-top` ... `09-ankle-boot` (sorted order is Fashion-MNIST's label order); NNNNN is the image's position
in its Fashion-MNIST split. Each 28 x 28 greyscale image is upsampled with PIL's bilinear filter, then made RGB by
multiplying the grey value by a tint drawn per image from [1 - tint, 1]^3 (default 0.25; the draw depends only on
the seed, split and position, never on the label, so colour carries no class information and the three channels
differ, as a real photo's do). Saved as baseline JPEG, quality 90. Nothing is downloaded: the idx files come from
--source (Debian's dataset-fashion-mnist by default). An existing non-empty OUT is refused; OUT appears only when
complete (written beside it, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
FOLDERS = [f"{i:02d}-{name}" for i, name in enumerate(CLASSES)]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SPLIT_SEED = {"train": 0, "val": 1}


def read_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    from raydistill.data.loaders import read_idx  # the package's own idx reader (gzipped or not)

    arrays = []
    for name in FILES[split]:
        path = next((p for p in (source / f"{name}.gz", source / name) if p.is_file()), None)
        if path is None:
            raise SystemExit(f"make_fmnist_folder: error: {source} has no {name}(.gz); install dataset-fashion-mnist "
                             "or pass --source DIR holding the four idx files")
        arrays.append(read_idx(path))
    return arrays[0], arrays[1]


def pick(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Positions to keep: every image, or the first `per_class` of each class (in the split's order)."""
    if per_class is None:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))])
    return np.sort(keep)


def tints(seed: int, split: str, positions: np.ndarray, strength: float) -> np.ndarray:
    """(n, 3) per-image channel factors in [1 - strength, 1], a function of (seed, split, position) only."""
    out = np.empty((len(positions), 3), np.float32)
    for i, p in enumerate(positions.tolist()):
        rng = np.random.default_rng([seed, SPLIT_SEED[split], p])
        out[i] = 1.0 - strength * rng.random(3)
    return out


def _write_chunk(job: tuple) -> int:
    images, factors, paths, size, quality = job
    for grey, factor, path in zip(images, factors, paths):
        big = np.asarray(Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BILINEAR),
                         dtype=np.float32)
        rgb = np.clip(np.rint(big[:, :, None] * factor[None, None, :]), 0, 255).astype(np.uint8)
        Image.fromarray(rgb, mode="RGB").save(path, format="JPEG", quality=quality)
    return len(paths)


def build(out: Path, source: Path = FASHION, size: int = 128, per_class: int | None = None,
          val_per_class: int | None = None, tint: float = 0.25, seed: int = 0, quality: int = 90,
          jobs: int | None = None) -> dict:
    """Write the stand-in to `out` (see the module docstring) and return what stand-in.json records."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"make_fmnist_folder: error: {out} already exists and is not empty; choose a new folder")
    if not 0.0 <= tint < 1.0:
        raise SystemExit(f"make_fmnist_folder: error: --tint {tint}: must be in [0, 1)")
    if val_per_class is None and per_class is not None:
        val_per_class = max(1, per_class // 6)  # Fashion-MNIST's own train:test ratio
    began = time.perf_counter()
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    counts: dict[str, int] = {}
    try:
        with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            for split, limit in (("train", per_class), ("val", val_per_class)):
                images, labels = read_split(source, split)
                keep = pick(labels, limit)
                for folder in FOLDERS:
                    (partial / split / folder).mkdir(parents=True)
                paths = [str(partial / split / FOLDERS[labels[p]] / f"{p:05d}.jpg") for p in keep.tolist()]
                factors = tints(seed, split, keep, tint)
                step = 500
                chunks = [(images[keep[i:i + step]], factors[i:i + step], paths[i:i + step], size, quality)
                          for i in range(0, len(keep), step)]
                counts[split] = sum(pool.map(_write_chunk, chunks))
        record = {"source": str(source), "size": size, "per_class": per_class, "val_per_class": val_per_class,
                  "tint": tint, "seed": seed, "quality": quality, "classes": FOLDERS, "counts": counts,
                  "build_s": round(time.perf_counter() - began, 1)}
        (partial / "stand-in.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="a new folder to write")
    ap.add_argument("--source", type=Path, default=FASHION, help=f"the Fashion-MNIST idx files (default {FASHION})")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    ap.add_argument("--per-class", type=int, help="training images per class (default: all 6000)")
    ap.add_argument("--val-per-class", type=int,
                    help="val images per class (default: all 1000, or per-class // 6 with --per-class)")
    ap.add_argument("--tint", type=float, default=0.25, help="per-image colour tint strength in [0, 1) (default 0.25)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    ap.add_argument("--jobs", type=int, help="processes (default: one per core)")
    args = ap.parse_args(argv)
    for name in ("size", "per_class", "val_per_class", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    record = build(args.out, args.source, args.size, args.per_class, args.val_per_class, args.tint, args.seed,
                   args.quality, args.jobs)
    print(json.dumps({"out": str(args.out), "counts": record["counts"], "build_s": record["build_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
