"""Model I/O (`jaxprune.modelio`): saved models, predictors and exports refuse damage and wrong
input with one jaxprune error line that names the file or the expected input.

Fast: a LeNet-5 on 8x8 digits saved with `save_model` directly (no pipeline run), a two-layer
function exported with `save_compact`. Every file of both is truncated, flipped and deleted.
"""
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import jaxprune
from jaxprune import data, errors, modelio, models

SHAPE = (8, 8, 1)
MEAN, STD = np.array([100.0], np.float32), np.array([60.0], np.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with one saved model, 'unpruned', and the model it holds."""
    workdir = str(tmp_path_factory.mktemp("modelio") / "work")
    model = models.get_model("lenet5", num_classes=10, input_shape=SHAPE, key=jax.random.key(0))
    _save(workdir, model, model.params)
    return workdir, model


def _save(workdir, model, params):
    """`modelio.save_model` of `params` as 'unpruned', for a digits-like dataset (fp32)."""
    dataset = types.SimpleNamespace(name="digits", num_classes=10, input_shape=SHAPE,
                                    mean=MEAN, std=STD)
    config = ml_collections.ConfigDict({"train": {"precision": "fp32"}})
    modelio.save_model(workdir, "unpruned", model, params, model.batch_stats,
                       dataset=dataset, config=config)


def _images(n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n,) + SHAPE, dtype=np.uint8)


def _reference(model, images):
    x = data.normalize(jnp.asarray(images, jnp.float32), MEAN, STD)
    return np.asarray(model.apply(model.params, model.batch_stats, x, train=False)[0])


def _one_line(error):
    text = str(error)
    assert "\n" not in text and len(text) < 600, text
    return text


# ----------------------------------------------------------------------------------------------
# What a predictor accepts


def test_predictor_equals_the_model_on_uint8_and_float_pixels(saved):
    workdir, model = saved
    predict = modelio.load_predictor(workdir, "unpruned", batch_size=2)  # 5 images: 3 batches
    images = _images()
    want = _reference(model, images)
    np.testing.assert_allclose(predict(images), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predict(images.astype(np.float32)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predict(images.astype(np.int64)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predict(images.astype(jnp.bfloat16)), want, rtol=1e-5, atol=1e-5)
    scaled = images.astype(np.float32) / 255.0
    np.testing.assert_allclose(predict(scaled, value_range=(0, 1)), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(predict(images.tolist()), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predict(images[2]), want[2], rtol=1e-5, atol=1e-5)  # one image
    assert predict(images[:0]).shape == (0, 10)
    unit = modelio.load_predictor(workdir, "unpruned", value_range=(0, 1))
    np.testing.assert_allclose(unit(scaled), want, rtol=1e-4, atol=1e-4)
    assert jaxprune.load_predictor is modelio.load_predictor


BAD_INPUTS = {
    "float scaled to [0, 1] without value_range": (lambda x: x / 255.0, {}, "value_range"),
    "bool": (lambda x: x > 128, {}, "bool"),
    "NaN": (lambda x: np.where(x > 250, np.nan, x / 1.0), {}, "NaN"),
    "inf": (lambda x: np.where(x > 250, np.inf, x / 1.0), {}, "NaN or infinite"),
    "float above 255": (lambda x: x * 2.0 + 1, {}, "outside value_range"),
    "negative float": (lambda x: x - 300.0, {}, "outside value_range"),
    "float above 1 with value_range (0, 1)": (lambda x: x / 1.0, {"value_range": (0, 1)},
                                              "outside value_range"),
    "int above 255": (lambda x: x.astype(np.int32) + 300, {}, "values"),
    "negative int": (lambda x: x.astype(np.int32) - 300, {}, "values"),
    "int with value_range (0, 1)": (lambda x: x, {"value_range": (0, 1)}, "integer pixels"),
    "wrong image shape": (lambda x: x[:, :7], {}, "shape"),
    "no channel axis": (lambda x: x[..., 0], {}, "shape"),
    "extra axis": (lambda x: x[None], {}, "shape"),
    "complex": (lambda x: x.astype(np.complex64), {}, "dtype"),
    "strings": (lambda x: np.array(["a", "b"]), {}, "dtype"),
    "None": (lambda x: None, {}, "dtype"),
    "ragged list": (lambda x: [x[0], x[0, :3]], {}, "uint8 images"),
    "bad value_range": (lambda x: x, {"value_range": (0, 2)}, "value_range"),
    "value_range not a pair": (lambda x: x, {"value_range": "0-1"}, "value_range"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_predictor_refuses_wrong_input_in_one_line(saved, case):
    workdir, _ = saved
    predict = modelio.load_predictor(workdir, "unpruned")
    make, options, needle = BAD_INPUTS[case]
    with pytest.raises(errors.InputError) as info:
        predict(make(_images()), **options)
    text = _one_line(info.value)
    assert needle in text
    if "images" in text and "value_range=" not in text.split(";")[0]:
        assert "uint8 images [N, 8, 8, 1]" in text  # names what it takes


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": True},
                                    {"batch_size": 2.5}, {"value_range": (0, 10)},
                                    {"method": "../unpruned"}, {"method": ""},
                                    {"method": None}, {"workdir": ""}, {"workdir": 3}])
def test_loader_refuses_wrong_arguments(saved, kwargs):
    workdir, _ = saved
    args = dict({"workdir": workdir, "method": "unpruned"}, **kwargs)
    with pytest.raises(errors.InputError) as info:
        modelio.load_predictor(**args)
    _one_line(info.value)


def test_unknown_method_names_the_saved_ones(saved):
    workdir, _ = saved
    with pytest.raises(errors.NotFoundError, match=r"Saved models: \['unpruned'\]"):
        modelio.restore_model(workdir, "evolution")


# ----------------------------------------------------------------------------------------------
# Damage to every file of a saved model


def _files(root):
    return sorted(os.path.relpath(os.path.join(folder, name), root)
                  for folder, _, names in os.walk(root) for name in names)


def _damage(path, how):
    if how == "delete":
        os.remove(path)
        return
    raw = open(path, "rb").read()
    if how == "truncate":
        raw = raw[:len(raw) // 2]
    else:  # flip one byte in the middle
        i = len(raw) // 2
        raw = raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1:]
    with open(path, "wb") as f:
        f.write(raw)


def test_every_file_of_a_saved_model_is_checked(saved, tmp_path):
    """Truncate, flip a byte in, delete each file: one ModelFileError naming that file."""
    workdir, _ = saved
    source = os.path.join(workdir, "models", "unpruned")
    names = _files(source)
    assert modelio.MODEL_INFO in names and "fingerprint.json" in names and len(names) > 8
    tried = 0
    for name in names:
        for how in ("truncate", "flip", "delete"):
            copy = str(tmp_path / f"w{tried}")
            shutil.copytree(source, os.path.join(copy, "models", "unpruned"))
            _damage(os.path.join(copy, "models", "unpruned", name), how)
            with pytest.raises(errors.ModelFileError) as info:
                modelio.load_predictor(copy, "unpruned")
            text = _one_line(info.value)
            assert os.path.join("unpruned", name) in text, (name, how, text)
            assert "rerun the same jaxprune command" in text
            tried += 1
    assert tried == 3 * len(names)


def _edit_info(workdir, tmp_path, edit, reseal=False):
    copy = str(tmp_path / "edited")
    shutil.copytree(os.path.join(workdir, "models"), os.path.join(copy, "models"))
    path = os.path.join(copy, "models", "unpruned", modelio.MODEL_INFO)
    info = json.load(open(path))
    edit(info)
    if reseal:
        modelio.save_sealed_json(path, info)
    else:
        json.dump(info, open(path, "w"))
    return copy


def test_a_changed_normalisation_number_is_detected(saved, tmp_path):
    workdir, _ = saved
    copy = _edit_info(workdir, tmp_path, lambda info: info["std"].__setitem__(0, 61.0))
    with pytest.raises(errors.ModelFileError, match="fails its checksum") as info:
        modelio.load_predictor(copy, "unpruned")
    assert "model.json" in _one_line(info.value)


@pytest.mark.parametrize("field", ["mean", "std", "spec", "input_shape", "num_classes", "input",
                                   "precision", "files", "step", "checksum"])
def test_a_missing_field_is_a_jaxprune_error_not_a_key_error(saved, tmp_path, field):
    workdir, _ = saved
    copy = _edit_info(workdir, tmp_path, lambda info: info.pop(field),
                      reseal=field != "checksum")
    with pytest.raises(errors.ModelFileError) as info:
        modelio.restore_model(copy, "unpruned")
    assert "model.json" in _one_line(info.value)


@pytest.mark.parametrize("field,value", [("std", [0.0]), ("mean", [float("nan")]),
                                         ("precision", "fp8"), ("input", {"kind": "audio"}),
                                         ("num_classes", 11), ("files", {"/etc/passwd": "x"})])
def test_an_invalid_field_is_refused_even_when_resealed(saved, tmp_path, field, value):
    workdir, _ = saved
    copy = _edit_info(workdir, tmp_path, lambda info: info.__setitem__(field, value),
                      reseal=True)
    with pytest.raises(errors.ModelFileError) as info:
        modelio.load_predictor(copy, "unpruned")
    assert "model.json" in _one_line(info.value)


def test_attach_rows_never_reseals_a_damaged_model_json(saved, tmp_path):
    workdir, _ = saved
    copy = _edit_info(workdir, tmp_path, lambda info: info["std"].__setitem__(0, 61.0))
    modelio.attach_rows(copy, [{"method": "unpruned", "accuracy": 0.5}])
    with pytest.raises(errors.ModelFileError, match="fails its checksum"):
        modelio.load_predictor(copy, "unpruned")
    modelio.attach_rows(workdir, [{"method": "unpruned", "accuracy": 0.5}])  # intact: sealed
    assert modelio.read_model_info(workdir)["row"] == {"method": "unpruned", "accuracy": 0.5}


# ----------------------------------------------------------------------------------------------
# Compact exports


def _two_layer():
    key1, key2 = jax.random.split(jax.random.key(3))
    variables = {"w1": jax.random.normal(key1, (6, 5)), "b1": jnp.zeros((5,)),
                 "w2": jax.random.normal(key2, (5, 3))}

    def apply_fn(v, x):
        return jnp.tanh(x @ v["w1"] + v["b1"][None]) @ v["w2"]

    return apply_fn, variables, jnp.ones((2, 6))


def test_export_round_trip_replaces_an_earlier_export_atomically(tmp_path):
    apply_fn, variables, x = _two_layer()
    target = str(tmp_path / "export")
    modelio.save_compact(target, apply_fn, variables, x)
    modelio.save_compact(target, apply_fn, jax.tree.map(lambda a: a * 2, variables), x)
    assert sorted(os.listdir(target)) == sorted(modelio.EXPORT_FILES)
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary or set-aside folder left
    fn, loaded = jaxprune.load_compact(target)
    x3 = jnp.ones((3, 6))
    np.testing.assert_allclose(fn(loaded, x3), apply_fn(jax.tree.map(lambda a: a * 2, variables),
                                                        x3), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(fn)(loaded, x3), fn(loaded, x3), rtol=1e-6)
    with pytest.raises(errors.InputError, match=r"takes \[N, 6\]"):
        fn(loaded, jnp.ones((3, 5)))


def test_export_never_overwrites_a_folder_of_other_files(tmp_path):
    apply_fn, variables, x = _two_layer()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(errors.InputError, match="holds other files"):
        modelio.save_compact(str(tmp_path), apply_fn, variables, x)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    with pytest.raises(errors.InputError, match="example_input"):
        modelio.save_compact(str(tmp_path / "e"), apply_fn, variables, "not an array")


def test_every_file_of_an_export_is_checked(tmp_path):
    apply_fn, variables, x = _two_layer()
    source = str(tmp_path / "export")
    modelio.save_compact(source, apply_fn, variables, x)
    tried = 0
    for name in modelio.EXPORT_FILES:
        for how in ("truncate", "flip", "delete"):
            copy = str(tmp_path / f"e{tried}")
            shutil.copytree(source, copy)
            _damage(os.path.join(copy, name), how)
            with pytest.raises(errors.ModelFileError) as info:
                modelio.load_compact(copy)
            text = _one_line(info.value)
            assert os.path.join(copy, name) in text and "save_compact" in text, (name, how, text)
            tried += 1
    with pytest.raises(errors.NotFoundError):
        modelio.load_compact(str(tmp_path / "nowhere"))


def test_dense_params_file_damage_is_named(saved, tmp_path):
    _, model = saved
    path = str(tmp_path / "dense.npz")
    modelio.save_dense_params(path, model.params, model.batch_stats)
    params, _ = modelio.load_dense_params(path, model)
    jax.tree.map(np.testing.assert_array_equal, params, model.params)
    for how in ("truncate", "flip"):
        copy = str(tmp_path / f"dense_{how}.npz")
        shutil.copy(path, copy)
        _damage(copy, how)
        with pytest.raises(errors.UserError) as info:
            modelio.load_dense_params(copy, model)
        assert copy in _one_line(info.value)


def test_a_replacement_stopped_before_model_json_leaves_the_old_model(saved, tmp_path,
                                                                       monkeypatch):
    """Killed after the new step is on disk but before model.json describes it: the old model
    (its step kept until then) still loads; the next save finishes the job."""
    workdir, model = saved
    copy = str(tmp_path / "w")
    shutil.copytree(os.path.join(workdir, "models"), os.path.join(copy, "models"))
    doubled = jax.tree.map(lambda a: a * 2, model.params)
    real = modelio._manifest

    def killed(directory, step):
        raise KeyboardInterrupt

    monkeypatch.setattr(modelio, "_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(copy, model, doubled)
    images = _images()
    np.testing.assert_allclose(modelio.load_predictor(copy, "unpruned")(images),
                               _reference(model, images), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(modelio, "_manifest", real)
    _save(copy, model, doubled)
    _, params, _ = modelio.restore_model(copy, "unpruned")
    jax.tree.map(np.testing.assert_array_equal, params, doubled)
    assert [n for n in os.listdir(os.path.join(copy, "models", "unpruned")) if n.isdigit()] == \
        [str(modelio.read_model_info(copy)["step"])]  # the old step removed once described


@pytest.mark.parametrize("damaged", ["array", "metadata"])
def test_saving_again_over_a_damaged_model_keeps_the_damaged_step_aside(saved, tmp_path,
                                                                          damaged):
    workdir, model = saved
    copy = str(tmp_path / "w")
    shutil.copytree(os.path.join(workdir, "models"), os.path.join(copy, "models"))
    folder = os.path.join(copy, "models", "unpruned")
    step = modelio.read_model_info(copy)["step"]
    names = [n for n in _files(folder) if n.startswith(f"{step}/")]
    name = next(n for n in names if ("/d/" in n) == (damaged == "array"))
    _damage(os.path.join(folder, name), "flip")
    _save(copy, model, model.params)
    images = _images()
    np.testing.assert_allclose(modelio.load_predictor(copy)(images), _reference(model, images),
                               rtol=1e-5, atol=1e-5)
    assert modelio.read_model_info(copy)["step"] == step + 1
    assert [n for n in os.listdir(folder) if n.startswith(f"{step}.corrupt-")]  # kept aside
