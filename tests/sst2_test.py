"""SST-2 through the pipeline: the text data path, configs/sst2.py and predictors on raw text.

The fast tests replace the TFDS reader with a few synthetic sentences (no TensorFlow); the
real-data test is marked slow."""
import os

import jax
import numpy as np
import pytest

from jaxprune import data
from jaxprune import errors
from jaxprune import modelio
from jaxprune import pipeline
from jaxprune import text

POSITIVE = ["a gripping , funny film ", "warm and funny ", "a gripping story ", "funny , warm "]
NEGATIVE = ["a dull , boring film ", "boring and flat ", "a dull mess ", "flat , boring "]


def _synthetic(n_train=96, n_test=40):
    rng = np.random.default_rng(0)

    def split(n):
        labels = rng.integers(0, 2, n).astype(np.int32)
        sentences = [(POSITIVE if y else NEGATIVE)[rng.integers(4)] for y in labels]
        return np.array(sentences, dtype=object), labels

    train_x, train_y = split(n_train)
    test_x, test_y = split(n_test)
    test_x[0] = "onlyintest " + test_x[0]  # a word the train split never shows
    return train_x, train_y, test_x, test_y


@pytest.fixture
def fake_sst2(monkeypatch):
    calls = []

    def fake(name, data_dir, download=False):
        calls.append(name)
        return _synthetic()

    monkeypatch.setattr(data, "_load_tfds_text", fake)
    data.clear_cache()
    yield calls
    data.clear_cache()


def _data_config(**overrides):
    config = pipeline.load_config("sst2:smoke").data
    config.update(overrides)
    return config


def test_text_dataset_is_token_ids_with_a_train_only_tokenizer(fake_sst2):
    ds = data.load(_data_config(val_size=16, train_size=None, test_size=None, seq_len=8))
    assert fake_sst2 == ["sst2"]
    assert ds.kind == "tokens" and ds.input_shape == (8,) and ds.num_classes == 2
    assert ds.mean is None and ds.std is None
    assert ds.train_images.dtype == np.int32 and ds.train_images.shape == (80, 8)
    assert ds.val_images.shape == (16, 8) and ds.test_images.shape == (40, 8)
    tokenizer = text.from_json(ds.tokenizer)
    assert "onlyintest" not in tokenizer.get_vocab()  # made from the train split only
    assert ds.test_images[0, 1] == tokenizer.token_to_id(text.UNK)
    assert int(ds.train_images.max()) < ds.vocab_size
    # every sentence starts with [CLS] and the rest is its words, then padding
    assert (ds.train_images[:, 0] == tokenizer.token_to_id(text.CLS)).all()


@pytest.mark.parametrize("overrides, match", [
    (dict(augment=True), "data.augment=True: sst2 is text"),
    (dict(cache="x.npz"), "data.cache"),
    (dict(seq_len=1), "data.seq_len=1"),
    (dict(vocab_size=True), "data.vocab_size=True"),
    (dict(source="portable"), "TFDS only"),
])
def test_bad_text_settings_are_refused(fake_sst2, overrides, match):
    with pytest.raises(ValueError, match=match):
        data.load(_data_config(**overrides))


def test_token_ids_pass_through_normalize():
    ids = np.array([[2, 5, 0]], np.int32)
    out = data.normalize(ids, None, None)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(out), ids)


def test_image_model_on_text_is_refused_before_training(fake_sst2, tmp_path):
    config = pipeline.load_config("sst2:smoke")
    config.model.name = "lenet5"
    with pytest.raises(errors.ConfigError, match="takes image input, but data.name='sst2'"):
        pipeline.run(config, str(tmp_path / "run"), progress=False)


def test_config_variants_load_by_name():
    for variant in ("smoke", "cpu", "gpu"):
        config = pipeline.load_config(f"sst2:{variant}")
        assert config.data.name == "sst2" and config.model.name == "transformer"
        assert config.prune.sparsity == 0.5
    with pytest.raises(ValueError, match="unknown variant"):
        pipeline.load_config("sst2:nope")


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(data, "_load_tfds_text", lambda name, data_dir, download=False: _synthetic())
    data.clear_cache()
    workdir = str(tmp_path_factory.mktemp("sst2") / "run")
    try:
        rows = pipeline.run(pipeline.load_config("sst2:smoke"), workdir, progress=False)
        dataset = data.load(pipeline.load_config("sst2:smoke").data)
    finally:
        mp.undo()
        data.clear_cache()
    return workdir, rows, dataset


METHODS = ["unpruned", "threshold", "sensitivity", "reinforce", "gan", "evolution", "random",
           "uniform"]


def test_smoke_run_reports_the_unpruned_transformer(smoke_workdir):
    workdir, rows, _ = smoke_workdir
    assert [r["method"] for r in rows] == METHODS
    row = rows[0]
    assert 0.0 <= row["accuracy"] <= 1.0 and row["macs"] > 0 and row["params"] > 0
    saved = os.path.join(workdir, "models", "unpruned")
    assert os.path.isfile(os.path.join(saved, "tokenizer.json"))
    info = modelio.read_model_info(workdir, "unpruned")
    assert info["input"]["kind"] == "text" and info["input"]["seq_len"] == 16
    assert "mean" not in info and "std" not in info


@pytest.mark.parametrize("method", METHODS[1:])
def test_every_method_prunes_heads_and_neurons_under_the_budget(smoke_workdir, method):
    """Each pruned row is at most 50 % of the dense MACs (at the config's seq_len); its saved
    model is the compacted Transformer (fewer heads, narrower FFNs) whose logits equal the
    masked fine-tuned model's (the phase's checkpoint); its predictor on raw text reproduces
    them."""
    from jaxprune import checkpoint
    workdir, rows, dataset = smoke_workdir
    row = {r["method"]: r for r in rows}[method]
    dense_macs = rows[0]["macs"]
    assert 0 < row["macs"] <= 0.5 * dense_macs and row["params"] < rows[0]["params"]
    assert set(row["kept_channels"]) == {"block0.heads", "block0.ffn", "block1.heads",
                                         "block1.ffn"}
    model, params, batch_stats = pipeline.restore_model(workdir, method)
    widths = dict(model.spec.widths)
    heads = [widths[f"block{i}.heads"] for i in range(widths["layers"])]
    ffn = [widths[f"block{i}.ffn"] for i in range(widths["layers"])]
    assert sum(heads) < widths["heads"] * widths["layers"] and min(heads) >= 1  # heads removed
    assert sum(ffn) < widths["ffn"] * widths["layers"]
    for i in range(widths["layers"]):
        attn = params[f"block{i}"]["attn"]
        assert attn["query"]["kernel"].shape[1] == heads[i] == attn["out"]["kernel"].shape[0]
        assert params[f"block{i}"]["ffn1"]["kernel"].shape[1] == ffn[i]
    assert {k: widths[k] for k in row["kept_channels"]} == row["kept_channels"]

    dense_model, _, _ = pipeline.restore_model(workdir, "unpruned")
    state, meta = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints", f"finetune_{method}")).restore()
    assert meta["done"]
    ids = dataset.test_images[:16]
    masked = dense_model.apply(state["params"], state["batch_stats"], ids, train=False)[0]
    compact = model.apply(params, batch_stats, ids, train=False)[0]
    np.testing.assert_allclose(np.asarray(compact), np.asarray(masked), atol=2e-5)

    sentences = list(_synthetic()[2])[:8]
    logits = pipeline.load_predictor(workdir, method)(sentences)
    ids = text.encode(text.from_json(dataset.tokenizer), sentences, dataset.input_shape[0])
    want = model.apply(params, batch_stats, ids, train=False)[0]
    np.testing.assert_allclose(logits, np.asarray(want), rtol=1e-5, atol=1e-5)


def _prune_on_dense(smoke_workdir, tmp_path, monkeypatch, **prune):
    """The smoke config's threshold method with `prune` settings, on the smoke run's dense
    checkpoint (restored, not retrained): (dense row, pruned row, workdir)."""
    import shutil
    monkeypatch.setattr(data, "_load_tfds_text", lambda name, data_dir, download=False: _synthetic())
    data.clear_cache()
    workdir = str(tmp_path / "run")
    shutil.copytree(os.path.join(smoke_workdir[0], "checkpoints", "dense"),
                    os.path.join(workdir, "checkpoints", "dense"))
    config = pipeline.load_config("sst2:smoke")
    config.prune.methods, config.search.methods = "threshold", ""
    config.prune.update(prune)
    try:
        dense, row = pipeline.run(config, workdir, progress=False)
    finally:
        data.clear_cache()
    return dense, row, workdir


@pytest.mark.slow  # ~25 CPU s each (a train fn with mask updates compiles)
@pytest.mark.parametrize("prune", [
    dict(schedule="gradual", criterion="taylor"),
    dict(schedule="imp", imp_rounds=2, criterion="mask_gradient")],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_schedules_and_gradient_criteria_prune_heads(smoke_workdir, tmp_path, monkeypatch, prune):
    """Gradient criteria score heads and neurons from token inputs; the gradual / iterative
    schedules' final masks are read back into kept heads (`masks.channel_keep_from_masks`)."""
    dense, row, workdir = _prune_on_dense(smoke_workdir, tmp_path, monkeypatch, **prune)
    assert row["schedule"] == prune["schedule"] and row["macs"] <= 0.5 * dense["macs"]
    model, params, batch_stats = pipeline.restore_model(workdir, "threshold")
    widths = dict(model.spec.widths)
    assert {k: widths[k] for k in row["kept_channels"]} == row["kept_channels"]
    assert widths["block0.heads"] + widths["block1.heads"] < 2 * widths["heads"]


def test_bn_scale_is_refused_for_the_transformer_before_training(fake_sst2, tmp_path):
    config = pipeline.load_config("sst2:smoke")
    config.prune.criterion = "bn_scale"
    with pytest.raises(errors.ConfigError, match="no BatchNorm producer.*Use criterion 'l1'"):
        pipeline.run(config, str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "dense")


def test_damaged_tokenizer_is_named(smoke_workdir, tmp_path):
    import shutil
    workdir = str(tmp_path / "copy")
    shutil.copytree(smoke_workdir[0], workdir)
    path = os.path.join(workdir, "models", "unpruned", "tokenizer.json")
    with open(path, "a") as f:
        f.write(" ")
    with pytest.raises(errors.ModelFileError, match="tokenizer.json fails its sha256"):
        pipeline.load_predictor(workdir, "unpruned")
    os.remove(path)
    with pytest.raises(errors.ModelFileError, match="tokenizer.json is missing"):
        pipeline.load_predictor(workdir, "unpruned")


def test_predictor_on_raw_text_gives_the_evaluated_logits(smoke_workdir):
    workdir, rows, dataset = smoke_workdir
    predict = pipeline.load_predictor(workdir, "unpruned")
    sentences = list(_synthetic()[2])[:8]
    logits = predict(sentences)
    assert logits.shape == (8, 2) and logits.dtype == np.float32
    model, params, batch_stats = pipeline.restore_model(workdir, "unpruned")
    ids = text.encode(text.from_json(dataset.tokenizer), sentences, dataset.input_shape[0])
    want = model.apply(params, batch_stats, ids, train=False)[0]
    np.testing.assert_allclose(logits, np.asarray(want), rtol=1e-5, atol=1e-5)
    # empty strings, unknown words and sentences longer than seq_len all work
    odd = predict(["", "zzz qqq unknown", "funny " * 100])
    assert odd.shape == (3, 2) and np.isfinite(odd).all()
    np.testing.assert_allclose(predict(["funny " * 100]), predict(["funny " * 15]), atol=1e-5)
    assert predict([]).shape == (0, 2)
    np.testing.assert_array_equal(predict(sentences[0]), logits[0])  # one str: one row


@pytest.mark.parametrize("bad, match", [
    (b"bytes", "list of strings"),
    ([b"bytes"], "not a str"),
    (np.zeros((2, 16), np.int32), "token ids or images"),
    (np.array(["ok", 3], dtype=object), "item 1 is a int"),
    ([1, 2], "not a str"),
])
def test_predictor_refuses_non_text(smoke_workdir, bad, match):
    predict = pipeline.load_predictor(smoke_workdir[0], "unpruned")
    with pytest.raises(errors.InputError, match=match):
        predict(bad)
    with pytest.raises(errors.InputError, match="value_range"):
        predict(["fine"], value_range=(0, 255))


@pytest.mark.slow
def test_real_sst2_splits():
    if not os.path.isdir(os.path.join(os.environ.get("TFDS_DATA_DIR", ""), "glue", "sst2")):
        pytest.skip("glue/sst2 is not prepared in $TFDS_DATA_DIR (../shared/tensorflow_datasets)")
    data.clear_cache()
    ds = data.load(pipeline.load_config("sst2:cpu").data)
    assert ds.train_images.shape == (65349, 64) and ds.val_images.shape == (2000, 64)
    assert ds.test_images.shape == (872, 64)  # GLUE's labelled validation split
    assert int(ds.test_labels.sum()) == 444  # positives in GLUE validation
    assert int(ds.train_labels.sum()) + int(ds.val_labels.sum()) == 37569
    assert (ds.test_images[:, -1] == text.PAD_ID).all()  # no validation sentence is truncated
    data.clear_cache()


def test_load_predictor_reads_the_tokenizer_once(smoke_workdir, monkeypatch):
    loads, real = [], text.load
    monkeypatch.setattr(text, "load", lambda path: loads.append(path) or real(path))
    predict = pipeline.load_predictor(smoke_workdir[0], "unpruned")
    assert predict(["funny"]).shape == (1, 2)
    assert len(loads) == 1, loads  # checked and read by the loader, not again by the predictor


@pytest.mark.slow
def test_the_committed_sst2_models_reproduce_their_rows():
    """experiments/2026-12-03_sst2_cpu: the saved unpruned and best pruned Transformers, run by
    `load_predictor` on GLUE's 872 raw validation sentences, score their rows' accuracy."""
    if not os.path.isdir(os.path.join(os.environ.get("TFDS_DATA_DIR", ""), "glue", "sst2")):
        pytest.skip("glue/sst2 is not prepared in $TFDS_DATA_DIR (../shared/tensorflow_datasets)")
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "experiments", "2026-12-03_sst2_cpu")
    _, _, sentences, labels = data._load_tfds_text("sst2", data._resolve_data_dir(None))
    assert sorted(os.listdir(os.path.join(folder, "models"))) == ["threshold", "unpruned"]
    for method in ("unpruned", "threshold"):
        logits = modelio.load_predictor(folder, method)(list(sentences))
        accuracy = float(np.mean(np.argmax(logits, -1) == labels))
        assert accuracy == pytest.approx(modelio.read_model_info(folder, method)["row"]["accuracy"],
                                         abs=1e-6), method
