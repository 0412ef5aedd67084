"""Bundle what scripts/gpu_selfcheck.sh needs for a GPU node without internet access, into .whl/.

    python scripts/offline_bundle.py                 # on a machine with internet and this checkout installed
    rsync -a ./ gpu-node:raydistill/                 # the checkout, .whl/ included, onto the GPU node
    bash scripts/gpu_selfcheck.sh OUTDIR             # on the GPU node, from the checkout

For an air-gapped GPU node that has Python (3.12 by default, --python to change) with CUDA torch, pyarrow, pandas,
aiohttp and requests, but not Ray, `higher`, tensorboardX, jsonschema or Fashion-MNIST. The bundle holds the wheels
of `higher`, tensorboardX and jsonschema (with its dependencies) at the versions installed here; Ray at the version
installed here, as an xz tarball of its installed files without the Java jar (raydistill's workers are Python; this
keeps the bundle small: about 24 MiB instead of a 79 MB wheel), which gpu_selfcheck.sh unpacks beside the wheels;
and the first --train-images / --test-images of the local Fashion-MNIST copy as idx .gz files: enough for
bench_scaling.py --gpu-share, whose quickstart reads real batches from the training split and evaluates nothing.

Writes OUT/*.whl, OUT/ray-VERSION-cpXY.tar.xz and OUT/fashion-mnist/ (about 29 MiB with the defaults), and fails if
the folder is over --limit-mib.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import io
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raydistill.data.loaders import read_idx  # noqa: E402

# Bundled as wheels, at the versions installed here: the benchmarks' reference, and what Ray and raydistill import
# that a CUDA torch image typically lacks.
WHEELS = ("higher", "tensorboardX", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py")
# Parts of Ray's wheel a single-node Python run never reads.
RAY_SKIP = ("ray/jars/",)
FMNIST = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def download(names: list[str], python: str, dest: Path) -> list[Path]:
    """pip download --no-deps of NAME==<version installed here> for CPython `python` on manylinux x86-64."""
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28)] + ["--platform=manylinux2014_x86_64"]
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in names]
    before = set(dest.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    f"--python-version={python}", "--implementation=cp", *platforms, "-d", str(dest), *pins],
                   check=True)
    return sorted(set(dest.glob("*.whl")) - before)


def ray_tarball(wheel: Path, out: Path) -> Path:
    """The wheel's files, less RAY_SKIP, as a tar.xz to unpack into a site-packages folder."""
    target = out / (wheel.name.split("-manylinux")[0] + ".tar.xz")
    with zipfile.ZipFile(wheel) as zf, tarfile.open(target, "w:xz", preset=9) as tar:
        for info in zf.infolist():
            if info.is_dir() or info.filename.startswith(RAY_SKIP):
                continue
            data = zf.read(info)
            member = tarfile.TarInfo(info.filename)
            member.size = len(data)
            member.mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
            member.mtime = int(time.mktime((*info.date_time, 0, 0, -1)))
            tar.addfile(member, io.BytesIO(data))
    return target


def write_idx(array: np.ndarray, path: Path) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes(), mtime=0))


def fashion_mnist_head(src: Path, dest: Path, train: int, test: int) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for stem in FMNIST:
        path = src / (stem + ".gz") if (src / (stem + ".gz")).exists() else src / stem
        if not path.exists():
            raise SystemExit(f"offline_bundle: {src / stem}.gz (or {stem}) is missing; run "
                             "scripts/ensure-fashion-mnist.sh or point --data at a Fashion-MNIST folder")
        keep = train if stem.startswith("train") else test
        write_idx(read_idx(path)[:keep], dest / (stem + ".gz"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".whl", help="the bundle folder (git-ignored; default .whl)")
    ap.add_argument("--python", default="3.12", help="the GPU node's Python version (default 3.12)")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="the local Fashion-MNIST folder")
    ap.add_argument("--train-images", type=int, default=10000, help="training images to bundle (default 10000)")
    ap.add_argument("--test-images", type=int, default=1000, help="test images to bundle (default 1000)")
    ap.add_argument("--limit-mib", type=float, default=60.0,
                    help="fail when the bundle is larger than this many MiB (default 60; keeps the bundle small)")
    args = ap.parse_args()
    if args.train_images < 1 or args.test_images < 1:
        ap.error("--train-images and --test-images must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fashion_mnist_head(Path(args.data), out / "fashion-mnist", args.train_images, args.test_images)
    for old in [*out.glob("*.whl"), *out.glob("ray-*.tar.xz")]:  # one version of each
        old.unlink()
    download(list(WHEELS), args.python, out)
    ray_wheels = download(["ray"], args.python, out)
    tarball = ray_tarball(ray_wheels[0], out)
    ray_wheels[0].unlink()
    files = [p for p in out.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files) / 2**20
    for p in sorted(files):
        print(f"{p.stat().st_size / 2**20:7.2f} MiB  {p}")
    print(f"{total:7.2f} MiB  in all ({tarball.name} from {ray_wheels[0].name})")
    if total > args.limit_mib:
        print(f"offline_bundle: {out} holds {total:.1f} MiB, over --limit-mib {args.limit_mib}; bundle fewer images",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
