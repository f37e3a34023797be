"""Portable CIFAR-10: decode time per decoder and thread count, and pixels against TFDS's.

Reads a portable file (made by `python -m jaxprune.data portable --out ...`), decodes all
60,000 records with each available decoder (simplejpeg when installed, Pillow always) and
compares every pixel with the TFDS path's pixels (`data._source`, TensorFlow's decoder):
max and mean absolute difference, the mean signed difference per channel (a bias
shifts the normalisation statistics), the fraction of pixels (and of images) that differ.

    TFDS_DATA_DIR=../shared/tensorflow_datasets \\
    python benchmarks/portable_fidelity.py --path .cache/cifar10_portable.npz \\
        --json experiments/2026-11-28_portable_cifar10/results.json

Decode times are wall seconds of one run each (speed depends on the cores and on the load).
"""
import argparse
import json
import os
import platform
import subprocess
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=".cache/cifar10_portable.npz")
    parser.add_argument("--name", default="cifar10")
    parser.add_argument("--threads", default="1,0", help="comma-separated; 0 = one per core")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    return parser.parse_args()


def main():
    args = parse_args()
    import numpy as np

    from jaxprune import data, portable

    meta, splits = portable.read(args.path, args.name)
    decoders = ["pillow"] + (["simplejpeg"] if portable._simplejpeg() is not None else [])
    results = {"file": {"path": args.path, "bytes": os.path.getsize(args.path),
                        "mib": round(os.path.getsize(args.path) / 2**20, 2),
                        "dataset": meta["dataset"], "tfds_version": meta["tfds_version"],
                        "counts": {s: v["count"] for s, v in meta["splits"].items()}},
               "decode_seconds": {}, "pixels_vs_tfds": {}}
    decoded = {}
    for decoder in decoders:
        for threads in [int(t) for t in args.threads.split(",")]:
            start = time.perf_counter()
            images = {s: portable.decode(splits[s], meta["image_shape"], decoder=decoder,
                                         threads=threads or None) for s in portable.SPLITS}
            seconds = time.perf_counter() - start
            label = f"{decoder}, {threads or os.cpu_count()} threads"
            results["decode_seconds"][label] = round(seconds, 2)
            print(f"decode 60,000 ({label}): {seconds:.2f} s", flush=True)
            decoded[decoder] = images

    train_x, _, test_x, _ = data._source(args.name, data._resolve_data_dir(None))  # TFDS pixels
    reference = {"train": train_x, "test": test_x}
    for decoder, images in decoded.items():
        diffs = [np.abs(images[s].astype(np.int16) - reference[s].astype(np.int16))
                 for s in portable.SPLITS]
        flat = np.concatenate([d.reshape(-1) for d in diffs])
        per_image = np.concatenate([d.reshape(d.shape[0], -1).max(1) for d in diffs])
        signed = sum(images[s].astype(np.float64).reshape(-1, images[s].shape[-1]).sum(0)
                     - reference[s].astype(np.float64).reshape(-1, images[s].shape[-1]).sum(0)
                     for s in portable.SPLITS) / (flat.size / images["test"].shape[-1])
        row = {"max_abs": int(flat.max()), "mean_abs": float(flat.mean()),
               "mean_signed_per_channel": [round(float(v), 4) for v in signed],
               "fraction_pixels_differ": float((flat != 0).mean()),
               "fraction_images_differ": float((per_image != 0).mean()),
               "images": int(per_image.size), "bit_exact": bool(flat.max() == 0)}
        results["pixels_vs_tfds"][decoder] = row
        print(f"{decoder}: {row}", flush=True)

    import PIL
    results["versions"] = {"numpy": np.__version__, "pillow": PIL.__version__,
                           "simplejpeg": getattr(portable._simplejpeg(), "__version__", None)}
    results["hardware"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    results["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
