"""Tests for jaxprune.data: sources, splits, cache, augmentation and batching."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import data, portable


def config(name, **kwargs):
    base = {"name": name, "data_dir": None, "val_size": 8, "train_size": None, "test_size": None}
    base.update(kwargs)
    return base


@pytest.fixture(autouse=True)
def fresh_cache():
    data.clear_cache()
    yield
    data.clear_cache()


def test_importing_data_does_not_import_tensorflow():
    code = ("import sys, jaxprune.data as d; d.load({'name': 'digits', 'val_size': 10}); "
            "assert not [m for m in sys.modules if m.startswith(('tensorflow', 'orbax'))]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_sources_with_mock_data(name, shape, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40):
        ds = data.load(config(name, data_dir=str(tmp_path), val_size=8))
        sub = data.load(config(name, data_dir=str(tmp_path), val_size=8, train_size=16,
                               test_size=10))
    assert ds.name == name and ds.num_classes == 10 and ds.input_shape == shape
    assert ds.train_images.shape == (32,) + shape and ds.train_images.dtype == np.uint8
    assert ds.val_images.shape == (8,) + shape and ds.test_images.shape == (40,) + shape
    for labels in (ds.train_labels, ds.val_labels, ds.test_labels):
        assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 10
    mean, std = data.channel_stats(ds.train_images)
    np.testing.assert_allclose(ds.mean, mean)
    np.testing.assert_allclose(ds.mean, ds.train_images.reshape(-1, shape[-1]).mean(0), rtol=1e-5)
    np.testing.assert_allclose(ds.std, ds.train_images.reshape(-1, shape[-1]).std(0), rtol=1e-4)
    assert ds.mean.dtype == ds.std.dtype == np.float32 and ds.mean.shape == (shape[-1],)
    # Subsets: same validation split, train a subset of the full train part.
    assert sub.train_images.shape[0] == 16 and sub.test_images.shape[0] == 10
    np.testing.assert_array_equal(sub.val_images, ds.val_images)
    full = {img.tobytes() for img in ds.train_images}
    assert all(img.tobytes() in full for img in sub.train_images)
    assert not ds.train_images.flags.writeable  # shared in-process copy


def test_digits_source():
    ds = data.load(config("digits", val_size=300))
    assert ds.input_shape == (8, 8, 1)
    assert ds.train_images.shape == (1797 - data.DIGITS_TEST_SIZE - 300, 8, 8, 1)
    assert ds.val_images.shape[0] == 300 and ds.test_images.shape[0] == data.DIGITS_TEST_SIZE
    assert ds.train_images.dtype == np.uint8 and ds.train_images.max() == 255
    assert set(np.unique(ds.train_labels)) == set(range(10))
    assert data.load(config("digits", val_size=300)) is ds  # cached
    data.clear_cache()
    again = data.load(config("digits", val_size=300))
    np.testing.assert_array_equal(again.val_images, ds.val_images)  # deterministic split
    np.testing.assert_array_equal(again.test_labels, ds.test_labels)
    train = {img.tobytes() + bytes([lab]) for img, lab in zip(ds.train_images, ds.train_labels)}
    assert len(train) > 0.9 * len(ds.train_images)


def test_unknown_name_and_bad_sizes():
    with pytest.raises(ValueError, match="supported: cifar10, mnist, fashion_mnist, digits"):
        data.load(config("imagenet"))
    with pytest.raises(ValueError, match=r"data.val_size=5000: use an int in \[0, 1436\]"):
        data.load(config("digits", val_size=5000))
    with pytest.raises(ValueError, match="data.train_size=99999"):
        data.load(config("digits", train_size=99999))


def test_missing_tfds_data_names_dataset_directory_and_fix(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    empty = tmp_path / "no_data_here"
    with pytest.raises(data.DataNotFoundError) as info:
        data.load(config("cifar10", data_dir=str(empty)))
    message = str(info.value)
    for part in ("'cifar10'", str(empty), "TFDS_DATA_DIR", "--config.data.data_dir"):
        assert part in message, message
    assert isinstance(info.value, FileNotFoundError)
    assert not os.path.exists(empty / "cifar10")  # nothing was downloaded


def test_npz_cache_roundtrip_and_mismatch(tmp_path):
    path = str(tmp_path / "digits.npz")
    ds = data.load(config("digits", val_size=50, cache=path))  # writes the cache
    assert os.path.exists(path)
    data.clear_cache()
    cached = data.load(config("digits", val_size=50, cache=path))  # reads it
    for field in data.Dataset._fields:
        np.testing.assert_array_equal(getattr(cached, field), getattr(ds, field))
    plain = data.load_cache(path)
    assert plain.input_shape == (8, 8, 1) and plain.name == "digits"
    with pytest.raises(ValueError, match="was made for"):
        data.load(config("digits", val_size=60, cache=path))


def test_normalize():
    images = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    mean, std = np.array([1.0, 2.0, 3.0], np.float32), np.array([2.0, 4.0, 8.0], np.float32)
    out = jax.jit(data.normalize)(images, mean, std)
    assert out.dtype == jnp.float32 and out.shape == images.shape
    np.testing.assert_allclose(out, (images.astype(np.float32) - mean) / std, rtol=1e-6)
    single = data.normalize(images[0], mean, std)  # one HWC image works too
    np.testing.assert_allclose(single, out[0])


def test_augment_is_a_padded_crop_or_flip_and_deterministic():
    images = jax.random.normal(jax.random.key(1), (8, 6, 5, 2))
    fn = jax.jit(data.augment, static_argnames=("pad", "flip"))
    a = fn(jax.random.key(0), images, pad=2)
    b = fn(jax.random.key(0), images, pad=2)
    c = fn(jax.random.key(7), images, pad=2)
    assert a.shape == images.shape and a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i in range(images.shape[0]):  # each output: a window of the padded input, maybe flipped
        crops = [padded[i, dy:dy + 6, dx:dx + 5] for dy in range(5) for dx in range(5)]
        windows = crops + [c[:, ::-1] for c in crops]
        assert any(np.array_equal(np.asarray(a[i]), w) for w in windows), i
    same = data.augment(jax.random.key(3), images, pad=0, flip=False)
    np.testing.assert_array_equal(same, images)


def test_epoch_batches():
    idx = data.epoch_batches(3, 50, 8)
    assert idx.shape == (6, 8) and idx.dtype == np.int32
    assert len(set(idx.ravel().tolist())) == 48 and idx.max() < 50
    np.testing.assert_array_equal(idx, data.epoch_batches(3, 50, 8))
    assert not np.array_equal(idx, data.epoch_batches(4, 50, 8))
    from_key = data.epoch_batches(jax.random.key(0), 50, 8)
    assert from_key.shape == (6, 8) and len(set(from_key.ravel().tolist())) == 48
    full = data.epoch_batches(3, 50, 8, drop_remainder=False)
    assert full.shape == (7, 8) and set(full.ravel().tolist()) == set(range(50))
    np.testing.assert_array_equal(full[:6], idx)
    with pytest.raises(ValueError, match="larger than the 5 examples"):
        data.epoch_batches(0, 5, 8)


def test_eval_batches_cover_every_example_once():
    idx, weights = data.eval_batches(21, 8)
    assert idx.shape == weights.shape == (3, 8)
    assert sorted(idx[weights > 0].tolist()) == list(range(21))
    assert weights.sum() == 21 and weights[-1].tolist() == [1.0] * 5 + [0.0] * 3
    labels = np.arange(21) % 3
    predictions = np.where(np.arange(21) < 7, labels, -1)  # 7 of 21 right
    correct = (predictions[idx] == labels[idx]) * weights
    assert correct.sum() / 21 == pytest.approx(1 / 3)
    empty_idx, empty_w = data.eval_batches(0, 8)
    assert empty_idx.shape == empty_w.shape == (0, 8)


@pytest.mark.slow
def test_real_cifar10_copy():
    data_dir = os.environ.get("TFDS_DATA_DIR")
    if not data_dir or not os.path.isdir(os.path.join(data_dir, "cifar10")):
        pytest.skip(f"no prepared cifar10 in TFDS_DATA_DIR={data_dir!r} (tests/conftest.py sets it "
                    "to ../shared/tensorflow_datasets when that folder exists)")
    ds = data.load(config("cifar10", val_size=5000, train_size=2000, test_size=500))
    assert ds.train_images.shape == (2000, 32, 32, 3) and ds.test_images.shape == (500, 32, 32, 3)
    assert ds.val_images.shape == (5000, 32, 32, 3)
    np.testing.assert_allclose(ds.mean, [124.0, 123.0, 113.0], atol=3.0)
    assert np.all((ds.std > 55) & (ds.std < 75))
    assert np.bincount(ds.val_labels, minlength=10).min() > 400


# ----------------------------------------------------------------------------------------------
# Portable files (jaxprune/portable.py): TFDS records in one .npz, read without TensorFlow.


@pytest.fixture(scope="module")
def portable_file(tmp_path_factory):
    """A portable cifar10 file made from mock TFDS data, and that data's TFDS-path Dataset."""
    tfds = pytest.importorskip("tensorflow_datasets")
    tmp_path = tmp_path_factory.mktemp("portable")
    path = str(tmp_path / "cifar10_portable.npz")
    cfg = config("cifar10", data_dir=str(tmp_path), val_size=8, train_size=20, test_size=30)
    data.clear_cache()
    with tfds.testing.mock_data(num_examples=40):
        assert data.main(["portable", "--out", path, "--data_dir", str(tmp_path)]) == 0  # the CLI
        meta, _ = portable.read(path, "cifar10")
        reference = data.load(cfg)
    data.clear_cache()
    return path, meta, cfg, reference


def test_portable_roundtrip_gives_the_tfds_dataset(portable_file):
    path, meta, cfg, reference = portable_file
    assert meta["dataset"] == "cifar10" and meta["tfds_version"] == "3.0.2"
    assert meta["image_shape"] == [32, 32, 3]
    assert {s: v["count"] for s, v in meta["splits"].items()} == {"train": 40, "test": 40}
    ds = data.load(dict(cfg, source="portable", portable_path=path))
    for field in data.Dataset._fields:  # same splits, same images, same mean / std
        np.testing.assert_array_equal(getattr(ds, field), getattr(reference, field), err_msg=field)
    decoded = portable.load(path, "cifar10", decoder="pillow", threads=3)
    assert decoded.decoder == "pillow" and decoded.bit_exact  # mock records are lossless PNG
    assert decoded.train_images.shape == (40, 32, 32, 3) and decoded.train_labels.dtype == np.int32


def test_portable_loader_imports_no_tensorflow(portable_file):
    path = portable_file[0]
    code = ("import sys; sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None\n"
            "import jaxprune.data as d\n"
            f"ds = d.load({{'name': 'cifar10', 'val_size': 8, 'source': 'portable', "
            f"'portable_path': {path!r}}})\n"
            "assert ds.train_images.shape == (32, 32, 32, 3), ds.train_images.shape\n"
            "assert not [m for m in sys.modules if m.startswith('tensorflow') and sys.modules[m]]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_portable_truncated_or_corrupt_file_is_refused(portable_file, tmp_path):
    path = portable_file[0]
    raw = open(path, "rb").read()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(portable.PortableFileError, match="truncated or corrupt") as info:
        data.load(config("cifar10", source="portable", portable_path=str(truncated)))
    assert "python -m jaxprune.data portable" in str(info.value)
    # Rewritten arrays with the old meta: the stored sha256 catches them.
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["train_labels"] = (arrays["train_labels"] + 1) % 10
    tampered = tmp_path / "tampered.npz"
    np.savez(tampered, **arrays)
    with pytest.raises(portable.PortableFileError, match="train labels fail their sha256"):
        portable.read(str(tampered))
    with pytest.raises(portable.PortableFileError, match="holds 'cifar10', but data.name='mnist'"):
        portable.read(path, "mnist")


def test_portable_source_needs_an_existing_path(tmp_path):
    with pytest.raises(portable.PortableFileError, match="needs data.portable_path") as info:
        data.load(config("cifar10", source="portable", portable_path=None))
    assert "python -m jaxprune.data portable --name cifar10 --out" in str(info.value)
    missing = str(tmp_path / "nowhere.npz")
    with pytest.raises(portable.PortableFileError, match="no file at") as info:
        data.load(config("cifar10", source="portable", portable_path=missing))
    assert missing in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match="data.source='tf': use one of tfds, portable"):
        data.load(config("cifar10", source="tf"))


def test_decoders_agree_on_lossless_records():
    from PIL import Image
    import io

    images = np.random.default_rng(0).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    records = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        records.append(buffer.getvalue())
    split = portable.pack(records, np.arange(5))
    assert split.offsets[-1] == split.data.size and split.labels.dtype == np.int32
    for decoder in ("pillow", "auto"):
        np.testing.assert_array_equal(portable.decode(split, (4, 6, 3), decoder=decoder), images)
    # JPEG (4:2:0): the direct libjpeg call gives Image.open's pixels; simplejpeg (when
    # installed) may differ from Pillow, as TensorFlow does (fast IDCT), by a few levels.
    jpegs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90, subsampling=2)
        jpegs.append(buffer.getvalue())
    expected = np.stack([np.asarray(Image.open(io.BytesIO(j))) for j in jpegs])
    jpeg_split = portable.pack(jpegs, np.arange(5))
    np.testing.assert_array_equal(portable.decode(jpeg_split, (4, 6, 3), decoder="pillow"),
                                  expected)
    auto = portable.decode(jpeg_split, (4, 6, 3), decoder="auto")
    assert np.abs(auto.astype(int) - expected).max() <= 8
    with pytest.raises(portable.PortableFileError, match="record 0 does not decode"):
        portable.decode(portable.pack([b"not an image"], [0]), (4, 6, 3), decoder="pillow")
    with pytest.raises(ValueError, match="decoder='tf'"):
        portable.resolve_decoder("tf")


def test_download_flag_reaches_tfds(monkeypatch, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    seen = {}

    def fake_load(name, **kwargs):
        seen.update(kwargs)
        raise FileNotFoundError("fake")

    monkeypatch.setattr(tfds, "load", fake_load)
    for download in (False, True):
        data.clear_cache()
        with pytest.raises(data.DataNotFoundError, match=f"data.download={download}"):
            data.load(config("cifar10", data_dir=str(tmp_path), download=download))
        assert seen["download"] is download


def test_embedded_digits_equal_scikit_learn():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    digits = sklearn_datasets.load_digits()
    with np.load(data.DIGITS_FILE) as z:
        assert z["images"].dtype == np.uint8
        np.testing.assert_array_equal(z["images"].astype(np.float64), digits.images)
        np.testing.assert_array_equal(z["labels"], digits.target)


def test_config_check_wants_a_portable_path():
    import importlib.util

    from jaxprune import config_checks

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "cifar10.py")
    spec = importlib.util.spec_from_file_location("_cifar10_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("smoke").to_dict()
    assert config_checks.problems(cfg) == [] and cfg["data"]["source"] == "tfds"
    cfg["data"]["source"] = "portable"
    found = config_checks.problems(cfg)
    assert len(found) == 1 and "data.source='portable' needs data.portable_path" in found[0] \
        and "python -m jaxprune.data portable --name cifar10" in found[0], found
    cfg["data"]["portable_path"] = "cifar10_portable.npz"
    assert config_checks.problems(cfg) == []
    cfg["data"].update(source="tf", download="yes")
    found = config_checks.problems(cfg)
    assert any("data.source='tf'" in p for p in found) and any("data.download" in p for p in found)
