"""Packs a jaxprune workdir into a few files (for a machine that returns ≤ 8 files of ≤ 16 MiB).

    python experiments/gpu/pack.py WORKDIR OUT_DIR

Writes results.json / results.md (as they are), dense_params.npz (the unpruned model's params
and batch stats, flattened as 'params/conv1/kernel', …, for later CPU studies),
workdir.tar.gz (everything but checkpoints/ and models/) and checkpoints.tar.gz (checkpoints/
and models/, to resume or restore later) when it fits under the limit. Prints one line per file.
"""
import os
import shutil
import sys
import tarfile


LIMIT = 15 * 2 ** 20  # bytes per file, under the 16 MiB the device machine returns


def dense_params(workdir, path):
    from jaxprune import modelio  # imports JAX; only this step needs it

    _, params, batch_stats = modelio.restore_model(workdir, "unpruned")
    modelio.save_dense_params(path, params, batch_stats)


def _tar(path, workdir, names):
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            tar.add(os.path.join(workdir, name), arcname=name)


def main(workdir, out):
    os.makedirs(out, exist_ok=True)
    if not os.path.isdir(workdir):
        print(f"pack: no workdir {workdir}; nothing to pack")
        return
    for name in ("results.json", "results.md"):
        if os.path.exists(os.path.join(workdir, name)):
            shutil.copy(os.path.join(workdir, name), os.path.join(out, name))
    try:
        dense_params(workdir, os.path.join(out, "dense_params.npz"))
    except Exception as e:  # noqa: BLE001 - a partial run may have no dense model yet
        print(f"pack: no dense params ({type(e).__name__}: {e})")
    entries = sorted(os.listdir(workdir))
    _tar(os.path.join(out, "workdir.tar.gz"), workdir,
         [e for e in entries if e not in ("checkpoints", "models", "lock", ".lock")])
    stores = [e for e in ("checkpoints", "models") if e in entries]
    if stores:
        path = os.path.join(out, "checkpoints.tar.gz")
        _tar(path, workdir, stores)
        if os.path.getsize(path) > LIMIT:
            print(f"pack: checkpoints.tar.gz is {os.path.getsize(path) / 2**20:.1f} MiB, over the "
                  "limit; left out")
            os.remove(path)
    for name in sorted(os.listdir(out)):
        size = os.path.getsize(os.path.join(out, name))
        flag = "  (over 16 MiB!)" if size > 16 * 2 ** 20 else ""
        print(f"pack: {name} {size / 2**20:.2f} MiB{flag}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python experiments/gpu/pack.py WORKDIR OUT_DIR")
    main(sys.argv[1], sys.argv[2])
