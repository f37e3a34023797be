"""The portable dataset file: a TFDS image dataset's encoded records in one .npz, no TensorFlow.

    python -m jaxprune.data portable --out .cache/cifar10_portable.npz   # where TFDS works (once)
    --config.data.source=portable --config.data.portable_path=...        # anywhere: numpy + Pillow

`jaxprune.data.make_portable` (which needs TensorFlow) writes the file; this module reads and
decodes it with numpy and Pillow only, and never imports TensorFlow. The file is an uncompressed
`.npz` (the records are JPEG / PNG bytes, compressed already):

    meta              JSON: format, dataset, tfds_version, image_shape, and per split the count,
                      the sha256 of each array below and of the pixels TFDS decodes them to
    {split}_bytes     uint8 [total]   every record's encoded image, concatenated, in TFDS order
    {split}_offsets   int64 [n + 1]   record i is bytes[offsets[i]:offsets[i + 1]]
    {split}_labels    int32 [n]

TFDS order matters: `data.load` carves the validation split from the training split by position
(`SPLIT_SEED`), so the same order gives the same validation images.

Decoding. TFDS decodes JPEG with TensorFlow's `decode_image`: libjpeg-turbo with the fast integer
IDCT (JDCT_IFAST) and fancy upsampling. `simplejpeg` (a manylinux wheel on PyPI) with
`fastdct=True, fastupsample=False` gives the same pixels bit for bit; Pillow can only use the
accurate IDCT (JDCT_ISLOW) with fancy upsampling, which differs by a few grey levels (see
experiments/2026-11-28_portable_cifar10). `decoder='auto'` uses simplejpeg when it is installed
and Pillow otherwise; PNG records (mnist) are lossless, so Pillow reproduces them exactly.
Records decode in threads (both decoders release the GIL).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import zipfile
from typing import NamedTuple, Optional, Sequence

import numpy as np

from jaxprune import errors
from jaxprune import files

FORMAT = "jaxprune-portable-1"
SPLITS = ("train", "test")
DECODERS = ("auto", "simplejpeg", "pillow")
MAKE_COMMAND = "python -m jaxprune.data portable --name {name} --out {path}"


class PortableFileError(errors.DataError, ValueError):
    """A portable file is missing, truncated, corrupt, or holds another dataset."""


class Split(NamedTuple):
    """One split's encoded records: record i is `data[offsets[i]:offsets[i + 1]]`."""

    data: np.ndarray  # uint8 [total]
    offsets: np.ndarray  # int64 [n + 1]
    labels: np.ndarray  # int32 [n]


class Decoded(NamedTuple):
    """A portable file decoded: arrays as `data._source` returns them, and how they were made."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    decoder: str  # 'simplejpeg' or 'pillow'
    bit_exact: bool  # every pixel equals what TFDS decodes (checked against the stored sha256)
    meta: dict


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def pack(records: Sequence[bytes], labels) -> Split:
    """Encoded records (bytes) and their labels → one `Split` of flat arrays."""
    lengths = np.fromiter((len(r) for r in records), np.int64, len(records))
    offsets = np.zeros(len(records) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.frombuffer(b"".join(records), np.uint8)
    return Split(data, offsets, np.asarray(labels, np.int32))


def write(path: str, name: str, tfds_version: str, image_shape: Sequence[int],
          splits: dict, pixels_sha256: dict) -> dict:
    """Writes `splits` ({'train': Split, 'test': Split}) to `path` atomically; returns the meta.

    `pixels_sha256[split]` is the sha256 of the uint8 pixels TFDS decodes the split to, so a
    reader can tell whether its decoder reproduces them exactly.
    """
    meta = {"format": FORMAT, "dataset": name, "tfds_version": str(tfds_version),
            "image_shape": [int(d) for d in image_shape], "splits": {}}
    arrays = {}
    for split, s in splits.items():
        if len(s.offsets) != len(s.labels) + 1 or int(s.offsets[-1]) != s.data.size:
            raise ValueError(f"portable.write: inconsistent {split!r} split.")
        arrays.update({f"{split}_bytes": s.data, f"{split}_offsets": s.offsets,
                       f"{split}_labels": s.labels})
        meta["splits"][split] = {
            "count": int(len(s.labels)), "pixels_sha256": pixels_sha256[split],
            **{f"{k}_sha256": sha256(arrays[f"{split}_{k}"]) for k in ("bytes", "offsets", "labels")}}
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with files.atomic_open(path, "wb") as f:
        np.savez(f, meta=np.asarray(json.dumps(meta, sort_keys=True)), **arrays)
    return meta


def _remake(name: str, path: str) -> str:
    return f"Make it again where TFDS works: `{MAKE_COMMAND.format(name=name, path=path)}`."


def read(path: str, name: Optional[str] = None) -> tuple[dict, dict]:
    """Reads and verifies a portable file → (meta, {split: Split}).

    Raises PortableFileError (a ValueError) when the file is missing, truncated or corrupt (zip
    CRC or sha256 mismatch), of another format, or holds a dataset other than `name`.
    """
    path = os.fspath(path)
    shown = name or "cifar10"
    if not os.path.isfile(path):
        raise PortableFileError(f"No portable dataset file at {os.path.abspath(path)}. "
                                + _remake(shown, path))
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT:
                raise PortableFileError(f"{path} is a {meta.get('format')!r} file, not {FORMAT!r}. "
                                        + _remake(meta.get("dataset", shown), path))
            splits = {s: Split(z[f"{s}_bytes"], z[f"{s}_offsets"], z[f"{s}_labels"])
                      for s in SPLITS}
    except PortableFileError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise PortableFileError(f"{path} is not a complete portable dataset file (truncated or "
                                f"corrupt: {type(e).__name__}: {e}). " + _remake(shown, path)) from e
    if name is not None and meta["dataset"] != name:
        raise PortableFileError(f"{path} holds {meta['dataset']!r}, but data.name={name!r}. "
                                + _remake(name, path))
    for split, s in splits.items():
        want = meta["splits"][split]
        for key, array in zip(("bytes", "offsets", "labels"), s):
            if sha256(array) != want[f"{key}_sha256"]:
                raise PortableFileError(f"{path}: the {split} {key} fail their sha256 check "
                                        "(the file is corrupt). " + _remake(meta["dataset"], path))
        if len(s.labels) != want["count"] or len(s.offsets) != want["count"] + 1:
            raise PortableFileError(f"{path}: the {split} split is not {want['count']} records.")
    return meta, splits


# ----------------------------------------------------------------------------------------------
# Decoding


def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def resolve_decoder(decoder: str = "auto") -> str:
    """'auto' → 'simplejpeg' when it is installed, else 'pillow'."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r}: use one of {', '.join(DECODERS)}.")
    if decoder == "auto":
        return "simplejpeg" if _simplejpeg() is not None else "pillow"
    if decoder == "simplejpeg" and _simplejpeg() is None:
        raise ImportError("decoder='simplejpeg' needs `pip install simplejpeg`.")
    return decoder


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame, any coding


def _jpeg_frame(record: bytes) -> Optional[tuple]:
    """(height, width, components) from a JPEG's start-of-frame segment, or None."""
    i, n = 2, len(record)
    while i + 9 < n and record[i] == 0xFF:
        marker = record[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _SOF_MARKERS:
            return ((record[i + 5] << 8) | record[i + 6], (record[i + 7] << 8) | record[i + 8],
                    record[i + 9])
        else:
            i += 2 + ((record[i + 2] << 8) | record[i + 3])
    return None


def _pillow_jpeg_direct(record: bytes, shape) -> np.ndarray:
    """Pillow's libjpeg decoder, called as `Image.open(...).load()` calls it (same tile
    arguments, same pixels) but without Pillow's Python header parsing, which costs ~3x the
    decode of a 32x32 image. Raises on anything unexpected; the caller falls back to Image.open.
    """
    from PIL import Image

    height, width, channels = shape
    mode = {1: "L", 3: "RGB"}[channels]
    if _jpeg_frame(record) != (height, width, channels):
        raise ValueError("not a JPEG of the expected shape")
    image = Image.new(mode, (width, height))
    decoder = Image._getdecoder(mode, "jpeg", (mode, ""))
    decoder.setimage(image.im, (0, 0, width, height))
    try:
        rest = record
        for _ in range(16):
            consumed, status = decoder.decode(rest)
            if consumed < 0:  # finished
                if status < 0:
                    raise OSError(f"libjpeg error {status}")
                return np.asarray(image)
            rest = rest[consumed:]
            if not rest:
                break
        raise OSError("truncated JPEG")
    finally:
        decoder.cleanup()


def _pillow_decode(record, shape) -> np.ndarray:
    from PIL import Image

    record = bytes(record)  # a uint8 array slice of the file's buffer, or bytes
    if record[:2] == b"\xff\xd8" and len(shape) == 3 and shape[-1] in (1, 3):
        try:
            return _pillow_jpeg_direct(record, shape)
        except Exception:  # noqa: BLE001 - the public path below decodes it or says why not
            pass
    with Image.open(io.BytesIO(record)) as image:
        mode = "L" if shape[-1] == 1 else "RGB"
        pixels = np.asarray(image if image.mode == mode else image.convert(mode))
    return pixels.reshape(shape)


def _decode_fn(decoder: str):
    if decoder == "pillow":
        return _pillow_decode
    simplejpeg = _simplejpeg()

    def decode(record, shape):
        if bytes(record[:2]) != b"\xff\xd8":  # not a JPEG (PNG is lossless: Pillow is exact)
            return _pillow_decode(record, shape)
        pixels = simplejpeg.decode_jpeg(record, colorspace="GRAY" if shape[-1] == 1 else "RGB",
                                        fastdct=True, fastupsample=False)
        return pixels.reshape(shape)

    return decode


def decode(split: Split, image_shape: Sequence[int], *, decoder: str = "auto",
           threads: Optional[int] = None) -> np.ndarray:
    """Decodes every record of `split` → uint8 [n, *image_shape], in parallel threads."""
    shape = tuple(int(d) for d in image_shape)
    fn = _decode_fn(resolve_decoder(decoder))
    n = len(split.labels)
    out = np.empty((n,) + shape, np.uint8)
    data, offsets = split.data, split.offsets.tolist()

    def work(lo, hi):
        for i in range(lo, hi):
            record = data[offsets[i]:offsets[i + 1]]
            try:
                out[i] = fn(record if fn is not _pillow_decode else record.tobytes(), shape)
            except Exception as e:  # noqa: BLE001 - re-raised with the record named
                raise PortableFileError(f"record {i} does not decode to {shape}: {e}") from e

    threads = threads or min(32, os.cpu_count() or 1)
    chunk = max(64, -(-n // (4 * threads)))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for job in [pool.submit(work, lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]:
            job.result()
    return out


def load(path: str, name: Optional[str] = None, *, decoder: str = "auto",
         threads: Optional[int] = None) -> Decoded:
    """Reads, verifies and decodes a portable file (numpy + Pillow, or simplejpeg)."""
    meta, splits = read(path, name)
    chosen = resolve_decoder(decoder)
    images = {s: decode(splits[s], meta["image_shape"], decoder=chosen, threads=threads)
              for s in SPLITS}
    exact = all(sha256(images[s]) == meta["splits"][s]["pixels_sha256"] for s in SPLITS)
    return Decoded(images["train"], splits["train"].labels, images["test"],
                   splits["test"].labels, chosen, exact, meta)
