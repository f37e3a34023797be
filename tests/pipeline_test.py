"""End to end: the quick-start smoke config through the whole pipeline, resumed, and bad input."""
import json
import os

import numpy as np
import pytest

from jaxprune import checkpoint, pipeline
from tables import assert_table_shows  # tests/ is on sys.path under pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"method", "accuracy", "params", "macs", "size_mb", "train_seconds", "latency_ms", "sparsity"}


# `smoke_run` (tests/conftest.py): one CLI run of the quick-start smoke config, every method.


def test_rows_for_every_method_with_all_columns(smoke_run):
    config, workdir, rows = smoke_run.config, smoke_run.workdir, smoke_run.rows
    methods = [r["method"] for r in rows]
    assert methods == ["unpruned", "threshold", "sensitivity", "reinforce", "gan", "evolution",
                       "random", "uniform"]
    saved = json.load(open(os.path.join(workdir, "results.json")))
    assert [r["method"] for r in saved] == methods
    for row in saved:
        assert KEYS <= set(row), row["method"]
    dense = rows[0]
    for row in rows[1:]:
        # Channel pruning at the MACs budget: the compact model is really smaller.
        assert row["macs"] <= (1 - config.prune.sparsity) * dense["macs"] + 1, row["method"]
        assert row["params"] < dense["params"] and row["size_mb"] < dense["size_mb"]
    log = json.load(open(os.path.join(workdir, "search_evolution.json")))
    assert len(log["candidates"]) == config.search.rounds * config.search.candidates
    assert all(c["macs_fraction"] <= 1 - config.prune.sparsity + 1e-6 for c in log["candidates"])
    assert_table_shows(open(os.path.join(workdir, "results.md")).read(), saved)
    metrics = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    assert {"dense"} <= {m.get("phase") for m in metrics}
    assert all(np.isfinite(m["loss"]) for m in metrics if m.get("loss") is not None)
    info = json.load(open(os.path.join(workdir, "run_info.json")))
    assert info["config"]["prune"]["sparsity"] == config.prune.sparsity and info["starts"]
    for name in ("search_pareto.png", "keep_ratios.png"):  # their series: report_test
        assert open(os.path.join(workdir, name), "rb").read(8) == b"\x89PNG\r\n\x1a\n", name


# restore_model (and load_predictor) reproduce the reported accuracy of the dense and a searched
# model: pipeline_outputs_test.test_predictor_equals_the_evaluation.
# A rerun of the finished run resumes and redoes nothing: pipeline_outputs_test (one CLI rerun).


def test_workdir_of_another_model_is_refused_and_kept(smoke_run, copy_run):
    config, workdir = smoke_run.config, copy_run
    other = config.copy_and_resolve_references()
    other.model.name = "mlp"
    listing = sorted(os.listdir(os.path.join(workdir, "checkpoints", "dense")))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="model"):
        pipeline.run(other, workdir, progress=False)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "dense"))) == listing


# Bad flags end the CLI with exit 2 before anything is written: main_test (the typo'd key, bad
# values); prune.sparsity=1.0 is refused by config_checks: configs_test (BAD_VALUES).


def test_changed_budget_is_refused_not_silently_reused(smoke_run, copy_run):
    config, workdir = smoke_run.config, copy_run
    other = config.copy_and_resolve_references()
    other.prune.sparsity = 0.6
    listing = sorted(os.listdir(os.path.join(workdir, "checkpoints", "finetune_threshold")))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="sparsity"):
        pipeline.run(other, workdir, progress=False)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "finetune_threshold"))) == listing


@pytest.mark.parametrize("granularity,target", [("channel", "macs"), ("unstructured", "params")])
def test_global_threshold_meets_the_budget(dense_workdir, tmp_path, granularity, target):
    _, (dense, pruned), _ = _run_on_dense(dense_workdir, tmp_path, scope="global",
                                          granularity=granularity, target=target, sparsity=0.6)
    assert pruned[target] <= 0.4 * dense[target] + 1
    assert pruned[target] >= 0.3 * dense[target]  # the budget is used, not undershot
    assert len(set(pruned["keep"])) > 1  # one global threshold gives per-unit keeps


def test_one_compiled_train_fn_and_eval_fn_serve_dense_and_finetune(tmp_path):
    """The dense phase and a masked fine-tune share one compiled train function (masks are
    state, rates and lengths arguments), and the dense model's evaluation compiles once for the
    validation and test splits together."""
    config = pipeline.load_config(os.path.join(REPO, "configs", "quickstart.py"), "smoke")
    with config.unlocked():
        config.train.checkpoint_every = 0
        config.finetune.epochs = 2
        config.finetune.learning_rate = 0.003
    from jaxprune import methods
    exp = pipeline.make_context(config, str(tmp_path), progress=False)
    dense_state, _ = pipeline.dense_phase(exp)
    pruner = pipeline.make_pruner(exp, dense_state)
    made = methods.handset_keep(pruner, "threshold", None, candidates=8)
    pipeline.handset_phase(exp, pruner, "threshold", made)
    # one chunk length (a whole epoch) for both phases
    assert exp.trainer.train_fn._cache_size() == 1
    assert exp.evaluate.compiled._cache_size() == 1


@pytest.mark.parametrize("multiple", [1, 2])
def test_projected_channel_keeps_are_whole_channels(tmp_path, multiple):
    """Channel keeps are projected on the grid of whole channels (or multiples): the masks keep
    exactly the planned channels, so the planned MACs are the model's MACs, within the budget."""
    import types
    config = pipeline.load_config(os.path.join(REPO, "configs", "quickstart.py"), "smoke")
    with config.unlocked():
        config.prune.channel_multiple = multiple
        config.prune.sparsity = 0.5
    exp = pipeline.make_context(config, str(tmp_path), progress=False)
    dense = types.SimpleNamespace(params=exp.model.params, batch_stats=exp.model.batch_stats)
    pruner = pipeline.make_pruner(exp, dense)
    sizes = np.asarray([g.size for g in pruner.groups])
    rng = np.random.default_rng(0)
    for keep in [np.ones(len(sizes))] + [rng.uniform(0.2, 1.0, len(sizes)) for _ in range(5)]:
        projected = pruner.project(keep.astype(np.float32))
        _, channel_keep = pruner.masks(projected)
        kept = np.asarray([int(np.sum(channel_keep[g.name])) for g in pruner.groups])
        np.testing.assert_allclose(kept / sizes, projected, atol=1e-5)
        assert np.all((kept % multiple == 0) | (kept == sizes))
        assert float(pruner.cost.macs(projected)) <= pruner.budget + 1e-3


# -- every path the configs allow, on the dense model of one run ---------------------------------


@pytest.fixture
def dense_workdir(smoke_run):
    """A workdir whose dense phase is done (the prune and search settings do not change it)."""
    return smoke_run.workdir


def _run_on_dense(dense_workdir, tmp_path, methods="threshold", searches="", **settings):
    """Runs `methods` / `searches` in a new workdir holding a copy of the finished dense phase;
    `settings` are prune.<key> (or search.<key> when spelled search_<key>) values."""
    import shutil
    workdir = str(tmp_path / "run")
    os.makedirs(os.path.join(workdir, "checkpoints"))
    shutil.copytree(os.path.join(dense_workdir, "checkpoints", "dense"),
                    os.path.join(workdir, "checkpoints", "dense"))
    config = pipeline.load_config(os.path.join(REPO, "configs", "quickstart.py"), "smoke")
    with config.unlocked():
        config.prune.methods, config.search.methods = methods, searches
        for key, value in settings.items():
            if key.startswith("search_"):
                config.search[key[len("search_"):]] = value
            else:
                config.prune[key] = value
    return config, pipeline.run(config, workdir, progress=False), workdir


@pytest.mark.parametrize("prune", [
    dict(schedule="gradual"), dict(schedule="imp", imp_rounds=2),
    dict(schedule="gradual", granularity="unstructured", scope="global", target="params"),
    # the criteria through the pipeline (~12-15 CPU s each; criteria_test checks their scores)
    pytest.param(dict(criterion="taylor"), marks=pytest.mark.slow),
    pytest.param(dict(criterion="snip", granularity="unstructured"), marks=pytest.mark.slow),
    pytest.param(dict(criterion="random", sparsity=0.5), marks=pytest.mark.slow)],
    ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_every_schedule_and_criterion_prunes_to_the_budget(dense_workdir, tmp_path, prune):
    _, (dense, row), workdir = _run_on_dense(dense_workdir, tmp_path, **prune)
    target = prune.get("target", "macs")
    budget = (1 - prune.get("sparsity", 0.8)) * dense[target]
    assert row[target] <= budget + 1, (row[target], budget)
    assert row[target] >= 0.5 * budget  # the budget is used, not undershot
    assert row["schedule"] == prune.get("schedule", "oneshot")
    phases = os.listdir(os.path.join(workdir, "checkpoints"))
    if prune.get("schedule") == "imp":
        assert {"finetune_threshold_imp1", "finetune_threshold_imp2"} <= set(phases)
    # the saved model restores and is the pruned one
    model, params, _ = pipeline.restore_model(workdir, "threshold")
    from jaxprune import costs
    if prune.get("granularity", "channel") == "channel":
        assert costs.count_params(params) == row["params"]


def test_nm_and_bn_scale_refused_before_training_where_they_do_not_fit(tmp_path):
    config = pipeline.load_config(os.path.join(REPO, "configs", "quickstart.py"), "smoke")
    with config.unlocked():
        config.prune.methods, config.search.methods = "threshold", ""
        config.prune.criterion = "bn_scale"
    with pytest.raises(pipeline.errors.ConfigError, match="no BatchNorm"):  # LeNet-5 has none
        pipeline.run(config, str(tmp_path / "bn"), progress=False)
    assert not os.path.exists(tmp_path / "bn" / "checkpoints" / "dense")
    config = pipeline.load_config(os.path.join(REPO, "configs", "quickstart.py"), "smoke")
    with config.unlocked():
        config.prune.methods, config.search.methods = "threshold", ""
        config.prune.granularity, config.prune.n, config.prune.m = "nm", 2, 4
    # LeNet-5's second conv reads 6 channels: refused at the start, nothing trained
    with pytest.raises(pipeline.errors.ConfigError, match=r"conv2.*\(6\).*e\.g\. 2"):
        pipeline.run(config, str(tmp_path / "lenet"), progress=False)
    assert not os.path.exists(tmp_path / "lenet" / "checkpoints" / "dense")
    with config.unlocked():
        config.model.name = "mlp"
    dense, row = pipeline.run(config, str(tmp_path / "mlp"), progress=False)
    assert 0.3 < row["sparsity"] < 0.5  # 2 of every 4 weights of the prunable kernels
    import jax
    _, params, _ = pipeline.restore_model(str(tmp_path / "mlp"), "threshold")
    kernels = [np.asarray(v) for v in jax.tree.leaves(params) if np.ndim(v) == 2]
    nm_kernels = [w for w in kernels if w.shape[0] % 4 == 0
                  and (w.reshape(-1, 4, w.shape[-1]) != 0).sum(1).max() <= 2]
    assert len(nm_kernels) >= 1 and len(nm_kernels) < len(kernels)  # the classifier is kept


def test_winner_selected_by_successive_halving(dense_workdir, tmp_path):
    config, (dense, row), workdir = _run_on_dense(
        dense_workdir, tmp_path, methods="", searches="random", search_select_top=3,
        search_select_finetune=2)
    log = json.load(open(os.path.join(workdir, "search_random.json")))
    stages = log["selection"]["stages"]
    assert [s["stage"] for s in stages] == ["validation", "short fine-tune"]
    assert len(stages[0]["rows"]) == 3 and len(stages[1]["rows"]) == 2
    assert set(stages[1]["rows"]) <= set(stages[0]["rows"])
    winner = stages[1]["rows"][int(np.argmax(stages[1]["scores"]))]
    np.testing.assert_allclose(log["best_keep"], log["candidates"][winner]["keep"], atol=1e-5)
    np.testing.assert_allclose(row["keep"], log["best_keep"], atol=1e-6)
    assert row["selection_scores"]["short fine-tune"] == max(stages[1]["scores"])
    # Changing the selection keeps the search (its checkpoint is reused), not the fine-tune.
    with config.unlocked():
        config.search.select_top = 2
    with pytest.raises(checkpoint.CheckpointMismatchError, match="select_top"):
        pipeline.run(config, workdir, progress=False)


def test_seeded_search_asks_the_seeds_first_and_pays_for_the_pre_pass(dense_workdir, tmp_path):
    from jaxprune import config_checks
    config, (dense, row), workdir = _run_on_dense(
        dense_workdir, tmp_path, methods="", searches="random",
        search_seed_keeps="uniform,sensitivity", search_rounds=12)
    log = json.load(open(os.path.join(workdir, "search_random.json")))
    seeds, cost = np.asarray(log["seeds"]), log["seed_evaluations"]
    k = int(config.search.candidates)
    assert seeds.shape == (2, 4) and cost > k  # LeNet-5: 4 units; 1 + 4 x grid evaluations
    assert len(log["candidates"]) == (12 - -(-cost // k)) * k  # total evaluations <= 12 x k
    first = np.asarray([c["keep"] for c in log["candidates"][:2]])
    # asked first, in the first round, and scored as they are (projections are fixed points)
    np.testing.assert_allclose(first, seeds, atol=1e-5)
    assert row["seed_evaluations"] == cost
    # No seeds: the key leaves the fingerprint, so workdirs made before it existed still match.
    assert "search.seed_keeps" in config_checks.phase_settings(config, "search_random")
    with config.unlocked():
        config.search.seed_keeps = ""
    assert "search.seed_keeps" not in config_checks.phase_settings(config, "search_random")
    # A pre-pass that costs the whole search is refused before the search starts.
    with config.unlocked():
        config.search.seed_keeps, config.search.rounds = "sensitivity", 2
    with pytest.raises(pipeline.errors.ConfigError, match="seed_keeps.*raise search.rounds"):
        pipeline.run(config, str(tmp_path / "too_few"), progress=False)
