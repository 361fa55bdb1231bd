"""Build the Fashion-MNIST subset that ships inside the mimbench package.

Source: the real Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, MIT licence) as installed by the Debian
package ``dataset-fashion-mnist`` under /usr/share/datasets/fashion-mnist/ (four idx .gz files).
Output: mimbench/data/fashion_mnist_subset.npz — 1200 images per class from the official train split
(12,000) and 200 per class from the official test split (2,000, our "val"), chosen with a fixed seed,
uint8 28×28, compressed.

    python scripts/build_fashion_mnist_subset.py [--src DIR] [--out FILE] [--seed 0]
"""
from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np

SRC = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parent.parent / "mimbench" / "data" / "fashion_mnist_subset.npz"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
PER_CLASS = {"train": 1200, "val": 200}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (gzip): big-endian header magic, dims, then uint8 data."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def build(src: Path = SRC, out: Path = OUT, seed: int = 0) -> Path:
    missing = [src / f for pair in FILES.values() for f in pair if not (src / f).is_file()]
    if missing:
        raise SystemExit(f"error: Fashion-MNIST files not found: {', '.join(map(str, missing))}.\n"
                         "Install them with: apt-get update && apt-get install dataset-fashion-mnist "
                         "(or pass --src DIR holding the four idx .gz files).")
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, (img_file, lbl_file) in FILES.items():
        images, labels = read_idx(src / img_file), read_idx(src / lbl_file).astype(np.int64)
        chosen = np.concatenate([rng.choice(np.flatnonzero(labels == c), PER_CLASS[split], replace=False)
                                 for c in range(10)])
        chosen = rng.permutation(chosen)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[chosen])
        arrays[f"{split}_labels"] = labels[chosen]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=SRC)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = build(args.src, args.out, args.seed)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
