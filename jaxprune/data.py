"""Datasets as in-memory uint8 arrays, and the device-side pieces of the input pipeline.

Host side, once per process: `load(config.data)` reads a whole dataset into numpy arrays
(TFDS for cifar10 / mnist / fashion_mnist, the 8x8 `digits` embedded in the package, a portable
file of the TFDS records, or a `.npz` cache) and carves a validation split out of the training
split with a fixed seeded permutation. The test split is only for final numbers. Batches are
index arrays (`epoch_batches`, `eval_batches`): the training step gathers `images[idx]` and then
runs the jittable `normalize` and `augment` on the device, so there is no per-step host work.

TensorFlow is imported lazily, inside the TFDS functions only: importing this module (or using
the `digits` source, a portable file or a cache) never imports it.

Portable files (`jaxprune/portable.py` holds the format and the TF-free reader):

    python -m jaxprune.data portable --name cifar10 --out .cache/cifar10_portable.npz
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import checks
from jaxprune import errors
from jaxprune import files

from jaxprune import portable as portable_lib

TFDS_DATASETS = ("cifar10", "mnist", "fashion_mnist")
# Text datasets: name -> (TFDS builder, the split used as this project's test split). GLUE keeps
# its test labels hidden, so SST-2's labelled `validation` split is the one reported.
TEXT_DATASETS = {"sst2": ("glue/sst2", "validation")}
DATASETS = TFDS_DATASETS + ("digits",) + tuple(TEXT_DATASETS)
NUM_CLASSES = {"cifar10": 10, "mnist": 10, "fashion_mnist": 10, "digits": 10, "sst2": 2}
TEXT_DEFAULTS = {"seq_len": 64, "vocab_size": 16384}  # data.seq_len / data.vocab_size

# The validation split (and any train/test subset) comes from this fixed seed, not from
# config.seed, so runs with different seeds are compared on the same examples.
SPLIT_SEED = 0
# `digits` has no official split: 360 of its 1797 images (20 %) are held out as its test split.
DIGITS_TEST_SIZE = 360
DIGITS_FILE = os.path.join(os.path.dirname(__file__), "datasets", "digits.npz")
SOURCES = ("tfds", "portable")

# The checks of the `data.*` keys (`config_checks` reads them; see `checks`).
CONFIG_CHECKS = {
    "data.name": checks.choice(DATASETS),
    "data.data_dir": checks.optional_str,
    "data.val_size": checks.integer(0),
    "data.train_size": checks.optional_integer(1),
    "data.test_size": checks.optional_integer(1),
    "data.augment": checks.boolean,  # train.Settings.from_config reads it too
}
OPTIONAL_CONFIG_CHECKS = {
    "data.cache": checks.optional_str, "data.source": checks.choice(SOURCES),
    "data.seq_len": checks.integer(2), "data.vocab_size": checks.integer(4),  # text data
    "data.portable_path": checks.optional_str, "data.download": checks.boolean,
}


class DataNotFoundError(errors.DataError, FileNotFoundError):
    """A TFDS dataset is not prepared in the data directory (and is not downloaded)."""


class Dataset(NamedTuple):
    """A dataset in host memory. Images are uint8 NHWC, labels int32.

    `mean` / `std` are per-channel float32 statistics of `train_images` (pixel units 0..255),
    for `normalize`. A text dataset (`kind='tokens'`) holds int32 [N, seq_len] token ids in the
    `*_images` fields, `mean` / `std` None (nothing to normalise) and its tokenizer as JSON
    (`text.from_json`), made from its train split only.
    """

    name: str
    num_classes: int
    input_shape: tuple  # (H, W, C)
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    mean: Optional[np.ndarray]
    std: Optional[np.ndarray]
    tokenizer: Optional[str] = None  # a text dataset's tokenizer, as JSON

    @property
    def kind(self) -> str:
        """What the examples are: 'image' (uint8 NHWC pixels, normalised and augmented on the
        device) or 'tokens' (int32 [N, seq_len] ids from the dataset's tokenizer, used as they
        are)."""
        return "image" if self.tokenizer is None else "tokens"

    @property
    def vocab_size(self) -> int:
        """Token ids are < vocab_size (0 for images)."""
        if self.tokenizer is None:
            return 0
        from jaxprune import text
        return text.vocab_size(text.from_json(self.tokenizer))


# ----------------------------------------------------------------------------------------------
# Sources: each returns (train_images, train_labels, test_images, test_labels) as numpy arrays.


def _resolve_data_dir(data_dir: Optional[str]) -> Optional[str]:
    """`data_dir`, else $TFDS_DATA_DIR, else None (TFDS's default), made absolute against the
    current folder once, here: a relative `TFDS_DATA_DIR=../shared/...` names the folder it names
    from where the command was started, whatever folder is current later."""
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
    return os.path.abspath(data_dir) if data_dir else None


def _import_tfds(name: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"Loading {name!r} from TFDS needs tensorflow-datasets: `pip install 'jaxprune[data]'`. "
            "Without TensorFlow, use --config.data.source=portable with a file made by `python -m "
            f"jaxprune.data portable --name {name} --out {name}_portable.npz` on a machine that has "
            "it (or --config.data.cache=...npz made with jaxprune.data.save_cache).") from e
    try:  # keep TensorFlow off the accelerators JAX uses
        import tensorflow as tf
        tf.config.set_visible_devices([], "GPU")
    except Exception:  # noqa: BLE001 - only a memory nicety; TFDS works either way
        pass
    return tfds


def _tfds_load(tfds, name: str, data_dir: Optional[str], download: bool, *,
               splits=("train", "test"), **kwargs):
    """`tfds.load` of the builder `name` ('cifar10', 'glue/sst2'), or a DataNotFoundError that
    says how to prepare it."""
    try:
        return tfds.load(name, split=list(splits), data_dir=data_dir, download=download,
                         **kwargs)
    except (AssertionError, FileNotFoundError, tfds.core.DatasetNotFoundError) as e:
        where = os.path.abspath(data_dir) if data_dir else \
            f"{tfds.core.constants.DATA_DIR} (TFDS's default; TFDS_DATA_DIR is not set)"
        raise DataNotFoundError(
            f"Dataset {name!r} was not found in {where} (data.download={download}). Prepare it "
            f"once where there is network (`python -c \"import tensorflow_datasets as tfds; "
            f"tfds.builder('{name}').download_and_prepare()\"`, or --config.data.download=True), "
            f"then point to the folder that holds {name}/ with the environment variable "
            f"TFDS_DATA_DIR=... or with --config.data.data_dir=... (TFDS error: {e})") from e


def _load_tfds(name: str, data_dir: Optional[str], download: bool = False):
    tfds = _import_tfds(name)
    splits = _tfds_load(tfds, name, data_dir, download, as_supervised=True)
    return _read_splits(tfds, splits, lambda batch: (batch[0].astype(np.uint8), batch[1]))


def _read_splits(tfds, splits, columns):
    """(examples, int32 labels) of every split in turn, as numpy arrays in TFDS's order;
    `columns(batch) -> (examples, labels)` picks them out of one numpy batch."""
    out = []
    for ds in splits:  # batch_size=-1 in tfds.load breaks under tfds.testing.mock_data
        examples, labels = [], []
        for batch in tfds.as_numpy(ds.batch(8192)):
            x, y = columns(batch)
            examples.append(x)
            labels.append(y)
        out += [np.concatenate(examples), np.concatenate(labels).astype(np.int32)]
    return tuple(out)


def _load_tfds_text(name: str, data_dir: Optional[str], download: bool = False):
    """(train sentences, train labels, test sentences, test labels); sentences a numpy array of
    str, in TFDS's order."""
    tfds = _import_tfds(name)
    builder, test_split = TEXT_DATASETS[name]
    splits = _tfds_load(tfds, builder, data_dir, download, splits=("train", test_split))
    return _read_splits(tfds, splits, lambda batch: (
        np.array([s.decode("utf-8") for s in batch["sentence"]], dtype=object), batch["label"]))


def _load_portable(name: str, path: str):
    decoded = portable_lib.load(path, name)
    logging.info("Decoded %s from %s with %s; pixels %s TFDS's.", name, path, decoded.decoder,
                 "equal" if decoded.bit_exact else "differ slightly from")
    return decoded[:4]


def load_digits():
    """The UCI 8x8 digits embedded in the package (0..16 grey levels) → uint8 0..255, NHWC, C=1.

    The same arrays, byte for byte, as scikit-learn's `load_digits` gave (see
    jaxprune/datasets/README.md); scikit-learn is not needed.
    """
    with np.load(DIGITS_FILE, allow_pickle=False) as z:
        counts, labels = z["images"], z["labels"].astype(np.int32)
    images = np.round(counts.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    test, train = np.sort(order[:DIGITS_TEST_SIZE]), np.sort(order[DIGITS_TEST_SIZE:])
    return images[train], labels[train], images[test], labels[test]


@functools.lru_cache(maxsize=2)
def _source(name: str, data_dir: Optional[str], download: bool = False,
            portable: Optional[tuple] = None):
    """`portable`: None (TFDS) or (absolute path, mtime) of a portable file."""
    if name == "digits":
        arrays = load_digits()
    elif name in TEXT_DATASETS:
        arrays = _load_tfds_text(name, data_dir, download)
    elif portable is not None:
        arrays = _load_portable(name, portable[0])
    else:
        arrays = _load_tfds(name, data_dir, download)
    for a in arrays:
        a.setflags(write=False)  # shared by every caller of the cache
    return arrays


# ----------------------------------------------------------------------------------------------
# Splits and statistics


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float32, pixel units) of uint8 NHWC images, in chunks."""
    if images.shape[0] == 0:
        raise ValueError("channel_stats: no images (the train split is empty).")
    total = np.zeros(images.shape[-1], np.float64)
    squares = np.zeros(images.shape[-1], np.float64)
    for start in range(0, images.shape[0], 4096):
        chunk = images[start:start + 4096].reshape(-1, images.shape[-1]).astype(np.float64)
        total += chunk.sum(0)
        squares += np.square(chunk).sum(0)
    count = images.size // images.shape[-1]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-3).astype(np.float32)


def _subset_size(key: str, value, available: int) -> Optional[int]:
    if value is None:
        return None
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) \
            or not 1 <= value <= available:
        raise ValueError(f"data.{key}={value!r}: use None (all) or an int in [1, {available}].")
    return int(value)


@functools.lru_cache(maxsize=4)
def _load(name: str, data_dir: Optional[str], val_size: int, train_size: Optional[int],
          test_size: Optional[int], download: bool = False,
          portable: Optional[tuple] = None, text_options: Optional[tuple] = None) -> Dataset:
    """`text_options`: ((key, value), ...) of TEXT_DEFAULTS' keys, for a text dataset."""
    train_x, train_y, test_x, test_y = _source(name, data_dir, download, portable)
    n = train_x.shape[0]
    if not isinstance(val_size, (int, np.integer)) or isinstance(val_size, bool) \
            or not 0 <= val_size < n:
        raise ValueError(f"data.val_size={val_size!r}: use an int in [0, {n - 1}] "
                         f"({name} has {n} training examples).")
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    val_idx, train_idx = order[:int(val_size)], order[int(val_size):]
    train_size = _subset_size("train_size", train_size, len(train_idx))
    if train_size is not None:
        train_idx = train_idx[:train_size]
    test_idx = np.arange(test_x.shape[0])
    test_size = _subset_size("test_size", test_size, len(test_idx))
    if test_size is not None:
        test_idx = np.random.default_rng(SPLIT_SEED + 1).permutation(len(test_idx))[:test_size]
    train_idx, val_idx, test_idx = np.sort(train_idx), np.sort(val_idx), np.sort(test_idx)
    if name in TEXT_DATASETS:
        return _tokenize(name, dict(text_options), train_x[train_idx], train_y[train_idx],
                         train_x[val_idx], train_y[val_idx], test_x[test_idx], test_y[test_idx])
    return _make_dataset(name, train_x[train_idx], train_y[train_idx], train_x[val_idx],
                         train_y[val_idx], test_x[test_idx], test_y[test_idx])


def _tokenize(name, options, train_x, train_y, val_x, val_y, test_x, test_y) -> Dataset:
    """Sentences → token ids with a tokenizer made from the train sentences only."""
    from jaxprune import text
    tokenizer = text.train_tokenizer(list(train_x), vocab_size=int(options["vocab_size"]))
    seq_len = int(options["seq_len"])
    arrays = [text.encode(tokenizer, list(x), seq_len) if i % 2 == 0 else x
              for i, x in enumerate((train_x, train_y, val_x, val_y, test_x, test_y))]
    for a in arrays:
        a.setflags(write=False)
    return Dataset(name, NUM_CLASSES[name], (seq_len,), *arrays, None, None,
                   tokenizer=text.to_json(tokenizer))


def _text_options(name: str, data_config) -> Optional[tuple]:
    if name not in TEXT_DATASETS:
        return None
    options = {}
    for key, default in TEXT_DEFAULTS.items():
        value = data_config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
            raise ValueError(f"data.{key}={value!r}: use an int >= 2 (default {default}).")
        options[key] = int(value)
    if data_config.get("augment"):
        raise ValueError(f"data.augment=True: {name} is text, and the augmentation (random "
                         "crops and flips) is for images; set --config.data.augment=False.")
    if data_config.get("cache"):
        raise ValueError(f"data.cache: {name} is text (tokenized in seconds from TFDS); the "
                         ".npz cache is for image datasets; remove data.cache.")
    return tuple(sorted(options.items()))


def _make_dataset(name, train_x, train_y, val_x, val_y, test_x, test_y,
                  mean=None, std=None) -> Dataset:
    if mean is None:
        mean, std = channel_stats(train_x)
    arrays = [train_x, train_y, val_x, val_y, test_x, test_y, mean, std]
    for a in arrays:
        a.setflags(write=False)
    return Dataset(name, NUM_CLASSES[name], tuple(int(d) for d in train_x.shape[1:]), *arrays)


def load(data_config) -> Dataset:
    """Loads the dataset a `config.data` (ConfigDict or dict) describes.

    Keys: name, data_dir (None → $TFDS_DATA_DIR → TFDS's default), val_size, train_size and
    test_size (None = all), cache (optional .npz path: read it when it exists, else load and
    write it), source ('tfds', the default, or 'portable': decode the file at portable_path with
    numpy + Pillow, no TensorFlow; same splits and statistics), download (tfds.load's download,
    default False); for a text dataset (sst2) seq_len (token ids per example: longer sentences
    are truncated, shorter ones padded) and vocab_size (the tokenizer's largest vocabulary),
    both optional (TEXT_DEFAULTS). Results are cached in-process, so a second call is free; the arrays are
    read-only.

    Raises:
      ValueError: unknown dataset name or source, or sizes that do not fit.
      DataNotFoundError: the TFDS data is not in the data directory.
      portable.PortableFileError (a ValueError): source='portable' without a path, or a missing,
        truncated or corrupt file.
    """
    name = data_config.get("name")
    if name not in DATASETS:
        raise ValueError(f"data.name={name!r} is not a known dataset; supported: "
                         f"{', '.join(DATASETS)}.")
    request = {"name": name, "val_size": data_config.get("val_size", 0),
               "train_size": data_config.get("train_size"),
               "test_size": data_config.get("test_size")}
    text_options = _text_options(name, data_config)
    cache = data_config.get("cache")
    if cache and os.path.exists(cache):
        path = os.path.abspath(cache)
        return _load_cache_checked(path, os.path.getmtime(path), tuple(sorted(request.items())))
    dataset = _load(name, _resolve_data_dir(data_config.get("data_dir")), request["val_size"],
                    request["train_size"], request["test_size"],
                    bool(data_config.get("download", False)), _portable_key(name, data_config),
                    text_options)
    if cache:
        save_cache(dataset, cache, request=request)
    return dataset


def _portable_key(name: str, data_config) -> Optional[tuple]:
    source = data_config.get("source") or "tfds"
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r}: use one of {', '.join(SOURCES)}.")
    if source != "tfds" and name in TEXT_DATASETS:
        raise ValueError(f"data.source={source!r}: {name} is read from TFDS only; use "
                         "data.source='tfds'.")
    if source == "tfds" or name == "digits":  # digits is embedded: no file to read
        return None
    path = data_config.get("portable_path")
    if not path:
        raise portable_lib.PortableFileError(
            "data.source='portable' needs data.portable_path, the file made once where TFDS works "
            f"with `{portable_lib.MAKE_COMMAND.format(name=name, path=name + '_portable.npz')}`; "
            f"then pass --config.data.portable_path={name}_portable.npz.")
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise portable_lib.PortableFileError(
            f"data.portable_path={data_config.get('portable_path')!r}: no file at {path}. Make it "
            f"where TFDS works: `{portable_lib.MAKE_COMMAND.format(name=name, path=path)}`.")
    return path, os.path.getmtime(path)


def clear_cache() -> None:
    """Forgets the in-process copies (tests that mock TFDS call this)."""
    _source.cache_clear()
    _load.cache_clear()
    _load_cache_checked.cache_clear()


# ----------------------------------------------------------------------------------------------
# .npz cache (for machines without TensorFlow)


ARRAY_FIELDS = Dataset._fields[3:11]  # train_images … std: what a cache file holds


def save_cache(dataset: Dataset, path: str, *, request: Optional[dict] = None) -> None:
    """Writes `dataset` as one compressed .npz of uint8/int32 arrays (atomically).

    `request` (the name and split sizes it was made for) is stored beside it, so `load` can
    refuse a cache made for other sizes.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fields = {k: np.asarray(getattr(dataset, k)) for k in ARRAY_FIELDS}
    with files.atomic_open(path, "wb") as f:
        np.savez_compressed(f, name=np.asarray(dataset.name),
                            request=np.asarray(json.dumps(request or {})), **fields)


def load_cache(path: str) -> Dataset:
    """Reads a cache written by `save_cache` (no TensorFlow needed)."""
    dataset, _ = _read_cache(path)
    return dataset


def _read_cache(path: str) -> tuple[Dataset, dict]:
    with np.load(os.fspath(path), allow_pickle=False) as z:
        name = str(z["name"])
        if name not in DATASETS:
            raise ValueError(f"{path}: cache of unknown dataset {name!r}.")
        arrays = [z[k] for k in ARRAY_FIELDS]
        request = json.loads(str(z["request"]))
    return _make_dataset(name, *arrays), request


@functools.lru_cache(maxsize=2)
def _load_cache_checked(path: str, mtime: float, request_items: tuple) -> Dataset:
    del mtime  # part of the lru key only: a rewritten file is read again
    dataset, made_for = _read_cache(path)
    request = dict(request_items)
    if made_for and made_for != request:
        raise ValueError(
            f"The data cache {path} was made for {made_for}, but the config asks for {request}. "
            "Point --config.data.cache at another file (or remove this one yourself) to rebuild.")
    if dataset.name != request["name"]:
        raise ValueError(f"The data cache {path} holds {dataset.name!r}, not {request['name']!r}.")
    return dataset


# ----------------------------------------------------------------------------------------------
# Portable file (made here, where TensorFlow may be imported; read by jaxprune/portable.py)


def make_portable(out: str, name: str = "cifar10", data_dir: Optional[str] = None,
                  download: bool = False) -> dict:
    """Writes TFDS's `name` train and test records, as stored (JPEG / PNG bytes), in TFDS order,
    with labels and checksums, to one portable file at `out`; returns its meta. Needs TensorFlow.

    The sha256 of the pixels the TFDS path decodes is stored too, so the TF-free reader can say
    whether its decoder reproduces them bit for bit.
    """
    if name not in TFDS_DATASETS:
        raise ValueError(f"make_portable: {name!r} is not a TFDS dataset ({', '.join(TFDS_DATASETS)}).")
    data_dir = _resolve_data_dir(data_dir)
    tfds = _import_tfds(name)
    raw = _tfds_load(tfds, name, data_dir, download,
                     decoders={"image": tfds.decode.SkipDecoding()})
    train_x, train_y, test_x, test_y = _source(name, data_dir, download)  # the TFDS path's pixels
    pixels = {"train": (train_x, train_y), "test": (test_x, test_y)}
    splits = {}
    for split, ds in zip(portable_lib.SPLITS, raw):
        records, labels = [], []
        for example in tfds.as_numpy(ds.batch(8192)):
            records += list(example["image"])
            labels.append(example["label"])
        splits[split] = portable_lib.pack(records, np.concatenate(labels))
        if not np.array_equal(splits[split].labels, pixels[split][1]):
            raise RuntimeError(f"make_portable: TFDS gave the {split} records in two orders.")
    version = tfds.builder(name, data_dir=data_dir).info.version
    return portable_lib.write(out, name, str(version), train_x.shape[1:], splits,
                              {s: portable_lib.sha256(pixels[s][0]) for s in pixels})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxprune.data",
        description="Data tools. `portable`: write a TFDS dataset to one file that "
                    "--config.data.source=portable reads without TensorFlow.")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("portable", help="TFDS records → one portable .npz (needs TFDS)")
    make.add_argument("--out", required=True, help="the file to write, e.g. cifar10_portable.npz")
    make.add_argument("--name", default="cifar10", choices=TFDS_DATASETS)
    make.add_argument("--data_dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR)")
    make.add_argument("--download", action="store_true", help="let TFDS download the dataset")
    args = parser.parse_args(argv)
    meta = make_portable(args.out, args.name, args.data_dir, args.download)
    counts = ", ".join(f"{s} {v['count']}" for s, v in meta["splits"].items())
    print(f"Wrote {args.out}: {meta['dataset']} {meta['tfds_version']} ({counts}), "
          f"{os.path.getsize(args.out) / 2**20:.1f} MiB. Use it with --config.data.source=portable "
          f"--config.data.portable_path={args.out}")
    return 0


# ----------------------------------------------------------------------------------------------
# Device side (jittable)


def _channel_vector(v, ndim: int) -> jax.Array:
    return jnp.reshape(jnp.asarray(v, jnp.float32), (1,) * (ndim - 1) + (-1,))


def pixel_stats(mean, std) -> tuple:
    """(mean, std) as float32 numpy arrays, or (None, None) for data without them (tokens)."""
    if mean is None:
        return None, None
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def normalize(images, mean, std) -> jax.Array:
    """uint8 (or float) images [..., C] → float32 `(x - mean) / std`, per channel.

    `mean` None (a dataset with no pixel statistics: token ids) → the input unchanged."""
    if mean is None:
        return jnp.asarray(images)
    x = jnp.asarray(images).astype(jnp.float32)
    return (x - _channel_vector(mean, x.ndim)) / _channel_vector(std, x.ndim)


def augment(key, images, pad: int = 4, flip: bool = True) -> jax.Array:
    """Random crop after zero padding by `pad`, and a random horizontal flip, per example.

    images: float32 NHWC (usually normalised, so the padding is the mean colour). `pad` and
    `flip` are Python values (static under jit). Deterministic for a given `key`.
    """
    n, h, w, c = images.shape
    keys = jax.random.split(key, n)

    def one(k, image):
        crop_key, flip_key = jax.random.split(k)
        if pad:
            padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
            dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * pad + 1)
            image = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
        if flip:
            image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1, :], image)
        return image

    return jax.vmap(one)(keys, images)


# ----------------------------------------------------------------------------------------------
# Host side: batches as index arrays


def _permutation(key_or_seed, num: int) -> np.ndarray:
    if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, bool):
        return np.random.default_rng(int(key_or_seed)).permutation(num)
    return np.asarray(jax.random.permutation(key_or_seed, num))


def epoch_batches(key_or_seed, num: int, batch_size: int,
                  drop_remainder: bool = True) -> np.ndarray:
    """One epoch of shuffled example indices, int32 [steps, batch_size].

    `key_or_seed`: a JAX key (e.g. `fold_in(key, epoch)`) or an int seed. With
    `drop_remainder=False` the last batch is filled up with the first indices of the
    permutation, so every example appears at least once and all batches have one shape.
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"epoch_batches: num={num} and batch_size={batch_size} must be >= 1.")
    perm = _permutation(key_or_seed, int(num)).astype(np.int32)
    if drop_remainder:
        steps = num // batch_size
        if steps == 0:
            raise ValueError(f"batch_size={batch_size} is larger than the {num} examples; "
                             "use a smaller batch size or drop_remainder=False.")
        return perm[:steps * batch_size].reshape(steps, batch_size)
    steps = math.ceil(num / batch_size)
    return np.resize(perm, steps * batch_size).reshape(steps, batch_size)


def eval_batches(num: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every example exactly once, in order: (indices int32 [steps, B], weights float32 [steps, B]).

    The last batch is padded with index 0 and weight 0, so `sum(weights * correct) / num` is
    the exact accuracy and every batch has one shape (one compilation).
    """
    if num < 0 or batch_size < 1:
        raise ValueError(f"eval_batches: num={num} must be >= 0 and batch_size={batch_size} >= 1.")
    steps = math.ceil(num / batch_size)
    flat = np.arange(steps * batch_size)
    valid = flat < num
    indices = np.where(valid, flat, 0).astype(np.int32).reshape(steps, batch_size)
    return indices, valid.astype(np.float32).reshape(steps, batch_size)


if __name__ == "__main__":
    raise SystemExit(main())
