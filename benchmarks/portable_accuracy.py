"""Test accuracy of a saved model through TFDS's pixels and through a portable file's pixels.

The portable file (`python -m jaxprune.data portable --out ...`) decodes its JPEG records without
TensorFlow: with simplejpeg (when installed) the pixels equal TFDS's bit for bit; with Pillow they
differ by a few grey levels. This measures what that costs in test accuracy for one trained model:

    TFDS_DATA_DIR=../shared/tensorflow_datasets \\
    python benchmarks/portable_accuracy.py --workdir runs/cifar10 \\
        --path .cache/cifar10_portable.npz [--method unpruned] [--test_size N]

The data block (name, split sizes) comes from the workdir's run_info.json, so each path's
per-channel mean / std are those `data.load` gives for the training split the model was trained
on; the test split is the whole official one unless --test_size is given. Prints each path's
accuracy and the difference in points for every decoder available (Pillow always).
"""
import argparse
import json
import os
from unittest import mock


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--path", default=".cache/cifar10_portable.npz")
    parser.add_argument("--method", default="unpruned", help="a saved model of the workdir")
    parser.add_argument("--test_size", type=int, default=None, help="default: the whole split")
    parser.add_argument("--batch_size", type=int, default=500)
    return parser.parse_args()


def main():
    args = parse_args()
    import jax
    import numpy as np

    from jaxprune import data, pipeline, portable

    with open(os.path.join(args.workdir, "run_info.json")) as f:
        data_config = dict(json.load(f)["config"]["data"])
    data_config.update(test_size=args.test_size, cache=None)
    model, params, batch_stats = pipeline.restore_model(args.workdir, args.method)

    @jax.jit
    def predict(x_uint8, mean, std):
        logits, _ = model.apply(params, batch_stats, data.normalize(x_uint8, mean, std),
                                train=False)
        return logits.argmax(-1)

    def accuracy(ds):
        correct = 0
        for start in range(0, len(ds.test_labels), args.batch_size):
            x = ds.test_images[start:start + args.batch_size]
            correct += int((np.asarray(predict(x, ds.mean, ds.std))
                            == ds.test_labels[start:start + args.batch_size]).sum())
        return 100.0 * correct / len(ds.test_labels)

    reference = data.load(dict(data_config, source="tfds"))
    tfds_acc = accuracy(reference)
    print(f"{args.workdir} [{args.method}], {data_config['name']} test split of "
          f"{len(reference.test_labels)}:")
    print(f"  TFDS pixels:                    {tfds_acc:.2f} %  (mean {np.round(reference.mean, 3)})")
    decoders = ["pillow"] + (["simplejpeg"] if portable._simplejpeg() is not None else [])
    for decoder in decoders:
        data.clear_cache()
        forced = mock.patch.object(portable, "_simplejpeg", lambda: None) \
            if decoder == "pillow" else mock.patch.object(portable, "_simplejpeg",
                                                          portable._simplejpeg)
        with forced:
            ds = data.load(dict(data_config, source="portable", portable_path=args.path))
        assert np.array_equal(ds.test_labels, reference.test_labels)
        acc = accuracy(ds)
        differ = int((ds.test_images != reference.test_images).reshape(len(ds.test_labels), -1)
                     .any(1).sum())
        print(f"  portable pixels ({decoder:10s}): {acc:.2f} %  ({acc - tfds_acc:+.2f} points; "
              f"{differ} of {len(ds.test_labels)} test images differ; mean {np.round(ds.mean, 3)})")


if __name__ == "__main__":
    main()
