"""The experiment driver: dense baseline → hand-set pruning and searches → fine-tune → compact → report.

It only sequences phases. What a phase reads is one `experiment.Experiment`, built once and
passed; the methods live in `methods` (hand-set keeps, seeds, the candidate evaluator), the
winner's selection in `selection`, training in `train.train` (the library's fine-tune too), the
workdir in `workdir`, model I/O in `modelio`. Every phase checkpoints into
`workdir/checkpoints/<phase>` and records its finished result there, so running the same
command on the same workdir again skips finished phases and continues an interrupted one from
its last checkpoint. Nothing in the workdir is ever deleted.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
import types
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import checkpoint as ckpt_lib
from jaxprune import config_checks
from jaxprune import data as data_lib
from jaxprune import errors
from jaxprune import experiment as experiment_lib
from jaxprune import masks as masks_lib
from jaxprune import methods as methods_lib
from jaxprune import models as models_lib
from jaxprune import modelio
from jaxprune import pruner as pruner_lib
from jaxprune import report as report_lib
from jaxprune import schedules as schedules_lib
from jaxprune import selection as selection_lib
from jaxprune import surgery
from jaxprune import train as train_lib
from jaxprune import workdir as workdir_lib
from jaxprune.search import budget as budget_lib

Experiment = experiment_lib.Experiment
_log = experiment_lib.log


# ----------------------------------------------------------------------------------------------
# Training phases


def train_phase(exp: Experiment, phase: str, *, params, batch_stats, masks, epochs: int,
                learning_rate: float, key, warmup_epochs: float = 0.0,
                trainer: Optional[train_lib.Trainer] = None, recipe: Optional[dict] = None):
    """`train.train` of the dense model's program (or `trainer`) as a checkpointed phase:
    trains, resumes, or restores a finished one; returns (state, train_seconds).

    The phase's checkpoints are fingerprinted with the model, the data and `recipe` (what
    determines the phase's result: schedule, keep vector, …), so a workdir made with other
    settings is refused with a message instead of being silently reused."""
    t, ds = exp.config.train, exp.dataset
    checkpointer = experiment_lib.checkpointer(exp, phase, extra=dict(
        recipe or {}, epochs=int(epochs), learning_rate=float(learning_rate),
        warmup_epochs=float(warmup_epochs), batch_size=int(t.batch_size),
        optimizer=str(t.optimizer), schedule=str(t.schedule), weight_decay=float(t.weight_decay),
        l1=float(t.l1), precision=str(t.precision), label_smoothing=float(t.label_smoothing),
        seed=int(exp.config.seed), train_examples=int(ds.train_images.shape[0])))
    images, labels = exp.train_data
    result = train_lib.train(
        trainer or exp.trainer, params, batch_stats, masks, images, labels, epochs=int(epochs),
        learning_rate=float(learning_rate), warmup_epochs=float(warmup_epochs), key=key,
        checkpointer=checkpointer, phase=phase, progress=exp.progress,
        log=functools.partial(_log, exp), evaluate=exp.evaluate, val=exp.val,
        checkpoint_every=int(t.checkpoint_every), writer=exp.writer, bars=exp.bars)
    return result.state, result.train_seconds


def dense_phase(exp: Experiment):
    """The trained unpruned model (state, row): trained here, or with `train.init_from` set, a
    trained one restored (`modelio.restore_to_start`; its row keeps the saved training time)."""
    m, cfg = exp.model, exp.config.train
    if cfg.get("init_from"):
        params, batch_stats, seconds = modelio.restore_to_start(
            cfg.init_from, str(cfg.init_method), model=m, dataset=exp.dataset)
        row = experiment_lib.measure_row(exp, "unpruned", model=m, params=params,
                                         batch_stats=batch_stats, train_seconds=seconds)
        _log(exp, f"[dense] restored train.init_from={cfg.init_from}: test accuracy "
                  f"{row['accuracy']:.4f}")
        return types.SimpleNamespace(params=params, batch_stats=batch_stats), row
    state, seconds = train_phase(exp, "dense", params=m.params, batch_stats=m.batch_stats,
                                 masks=masks_lib.ones_like(m.params), epochs=int(cfg.epochs),
                                 learning_rate=float(cfg.learning_rate),
                                 warmup_epochs=float(cfg.warmup_epochs), key=exp.keys["train"])
    row = experiment_lib.measure_row(exp, "unpruned", model=m, params=state.params,
                                     batch_stats=state.batch_stats, train_seconds=seconds)
    return state, row


# ----------------------------------------------------------------------------------------------
# Pruning: keep vectors → masks → fine-tune → compact


def finish(exp: Experiment, pruner: pruner_lib.Pruner, method: str, keep, *,
           extra: Optional[dict] = None) -> dict:
    """Masks at `keep`, fine-tunes, compacts (channel), saves and measures; returns the row.

    The threshold method follows `prune.schedule`: `oneshot` prunes to `keep` and fine-tunes;
    `gradual` starts dense and raises the sparsity along Zhu & Gupta's cubic schedule during
    fine-tuning; `imp` prunes in `prune.imp_rounds` rounds, rewinding the survivors to the
    dense weights before each round's training (lottery-ticket style). Searched and
    sensitivity keeps are always applied one-shot.
    """
    m = exp.model
    masks, channel_keep = pruner.masks(keep)
    schedule = str(exp.config.prune.schedule) if method == "threshold" else "oneshot"
    if schedule == "oneshot":
        state, seconds = finetune_phase(exp, pruner, f"finetune_{method}", masks, pruner.params)
    else:
        state, seconds = _scheduled(exp, pruner, method, schedule, keep, masks)
        masks = state.masks
        if pruner.granularity == "channel":
            channel_keep = masks_lib.channel_keep_from_masks(masks, pruner.groups)
    extra = dict(extra or {}, keep=[float(v) for v in np.asarray(keep)], units=pruner.units,
                 granularity=pruner.granularity, schedule=schedule)
    if pruner.granularity == "channel":
        extra["kept_channels"] = {name: int(np.sum(v)) for name, v in channel_keep.items()}
        small = surgery.slice_variables({"params": state.params, "batch_stats": state.batch_stats},
                                        pruner.discovery, channel_keep)
        m = models_lib.with_widths(m, extra["kept_channels"], small["params"],
                                   small["batch_stats"])
        params, batch_stats, masks = m.params, m.batch_stats, None
    else:
        params, batch_stats, masks = state.params, state.batch_stats, state.masks
    modelio.save_model(exp.workdir, method, m, params, batch_stats, dataset=exp.dataset,
                       config=exp.config, masks=masks)
    return experiment_lib.measure_row(exp, method, model=m, params=params,
                                      batch_stats=batch_stats, masks=masks,
                                      train_seconds=seconds, extra=extra)


def finetune_phase(exp: Experiment, pruner: pruner_lib.Pruner, phase: str, masks, params,
                   trainer: Optional[train_lib.Trainer] = None, epochs: Optional[int] = None,
                   key=None):
    """The configured fine-tune (`finetune.*`; `epochs` overrides its length) of `params` under
    `masks`, a checkpointed phase. `key` (default: from the phase name) orders the data."""
    fcfg, pcfg = exp.config.finetune, exp.config.prune
    recipe = {"granularity": pruner.granularity, "scope": str(pcfg.scope),
              "target": str(pcfg.target), "sparsity": float(pcfg.sparsity),
              "criterion": str(pcfg.criterion), "schedule": str(pcfg.schedule),
              "kept_weights": int(masks_lib.count(masks).kept)}
    if key is None:
        key = jax.random.fold_in(exp.keys["finetune"], methods_lib.stable_hash(phase))
    return train_phase(exp, phase, params=params, batch_stats=pruner.batch_stats, masks=masks,
                       epochs=int(fcfg.epochs if epochs is None else epochs),
                       learning_rate=float(fcfg.learning_rate),
                       warmup_epochs=float(fcfg.warmup_epochs), key=key, trainer=trainer,
                       recipe=recipe)


def _scheduled(exp: Experiment, pruner: pruner_lib.Pruner, method: str, schedule: str, keep,
               oneshot_masks):
    """Gradual or iterative pruning towards the one-shot masks' sparsity."""
    cfg = exp.config
    scope = str(cfg.prune.scope)
    if scope == "layerwise":
        final = 1.0 - float(np.mean(np.asarray(keep)))  # threshold keeps are uniform per unit
    else:
        fn = None if pruner.granularity == "channel" else pruner.prunable_fn
        final = float(masks_lib.count(oneshot_masks, fn).sparsity)
    groups = pruner.groups if pruner.granularity == "channel" else None
    per_group = scope == "layerwise" and groups is not None  # end at the plan's channels
    update = functools.partial(schedules_lib.update_masks, scope=scope,
                               granularity=pruner.granularity, groups=groups,
                               prunable_fn=pruner.prunable_fn,
                               final_keep=np.asarray(keep, np.float32) if per_group else None)
    dense_masks = masks_lib.ones_like(pruner.params)
    if schedule == "gradual":
        steps = int(cfg.finetune.epochs) * max(
            exp.dataset.train_images.shape[0] // int(cfg.train.batch_size), 1)
        end = max(int(0.75 * steps), 2)
        sched = schedules_lib.polynomial(final, begin_step=0, end_step=end,
                                         frequency=max(end // 20, 1))
        ds = exp.dataset  # masks updated inside the step: a program of its own
        trainer = train_lib.make_trainer(
            exp.model.apply, exp.trainer.settings, mean=ds.mean, std=ds.std,
            unprunable=exp.model.unprunable,
            mask_update_fn=lambda step, p, mk: update(step, p, mk, sched))
        return finetune_phase(exp, pruner, f"finetune_{method}_gradual", dense_masks,
                              pruner.params, trainer=trainer)
    rounds = int(cfg.prune.get("imp_rounds", 3))
    sched = schedules_lib.imp(rounds, 1.0 - (1.0 - final) ** (1.0 / rounds), round_steps=1)
    masks, params, seconds = dense_masks, pruner.params, 0.0
    state = None
    for r in range(rounds):
        masks = update(jnp.int32(r + 1), params, masks, sched)
        params = schedules_lib.rewind(pruner.params, masks)
        state, sec = finetune_phase(exp, pruner, f"finetune_{method}_imp{r + 1}", masks, params)
        params, seconds = state.params, seconds + sec
    return state, seconds


# ----------------------------------------------------------------------------------------------
# Methods


def handset_phase(exp: Experiment, pruner: pruner_lib.Pruner, method: str,
                  made: methods_lib.HandsetKeep) -> dict:
    """Fine-tunes, compacts and measures the hand-set keep `made` (`methods.handset_keep`)."""
    macs_fraction = float(pruner.cost.macs(jnp.asarray(made.keep))) / pruner.cost.dense_macs \
        if pruner.granularity == "channel" else None
    return finish(exp, pruner, method, made.keep,
                  extra=dict(made.extra, planned_macs_fraction=macs_fraction))


def select_winner(exp: Experiment, pruner: pruner_lib.Pruner, method: str, log,
                  validate: Optional[Callable] = None) -> dict:
    """`selection.select_winner` over a search log with the run's scoring: `validate` (default:
    a new candidate evaluator on the first `select_val_examples` validation images) and short
    fine-tunes, each a phase (`select_<method>_<i>`), judged on the same images."""
    s = selection_lib.selection_settings(exp.config)
    if not s:
        return {}
    n_val = selection_lib.select_val_examples(exp.config, exp.dataset.val_images.shape[0])
    if validate is None:
        validate = methods_lib.candidate_evaluator(exp, pruner, val=(0, n_val))
    images = experiment_lib.val_images(exp, 0, n_val)

    def short_finetune(keeps):  # the configured fine-tune, shortened; each a phase
        out = []
        for i, keep in enumerate(keeps):
            state, _ = finetune_phase(exp, pruner, f"select_{method}_{i}", pruner.masks(keep)[0],
                                      pruner.params, epochs=s["select_epochs"])
            out.append(float(exp.evaluate(state.params, state.batch_stats, images)["accuracy"]))
        return np.asarray(out)

    # Scored `search.candidates` at a time, the shape the search's evaluator compiled for.
    chunked = functools.partial(pruner_lib.score_in_chunks, validate,
                                k=int(exp.config.search.candidates))
    picked = selection_lib.select_winner(log, s, validate=chunked, short_finetune=short_finetune)
    _log(exp, selection_lib.describe(method, picked))
    return picked


def search_phase(exp: Experiment, pruner: pruner_lib.Pruner, method: str, evaluate: Callable,
                 seeds, seed_evaluations: int, validate: Optional[Callable] = None):
    """Runs (or resumes) the search `method`, selects and finishes its winner; returns
    (row, loop.SearchResult with the selected best_keep)."""
    s = exp.config.search
    rounds = methods_lib.search_rounds(s, seed_evaluations)
    checkpointer = experiment_lib.checkpointer(exp, f"search_{method}", extra={
        "units": pruner.units, "rounds": int(s.rounds), "candidates": int(s.candidates),
        "method": method, "budget": float(pruner.budget), "lower": float(s.lower),
        "val_examples": int(s.val_examples), "seed": int(exp.config.seed)})
    result = pruner.search(
        method, evaluate,
        key=jax.random.fold_in(exp.keys["search"], methods_lib.stable_hash(method)),
        rounds=rounds, candidates=int(s.candidates),
        hparams=dict(s.get(method, {})),  # search.<method>
        seeds=seeds, checkpointer=checkpointer, name=method,
        progress=exp.progress and exp.bars, writer=exp.writer)
    selection = select_winner(exp, pruner, method, result.log, validate)
    best_keep = selection.get("best_keep", result.best_keep)
    ckpt_lib.save_json(os.path.join(exp.workdir, f"search_{method}.json"), {
        "method": method, "units": pruner.units, "best_keep": np.asarray(best_keep).tolist(),
        "best_accuracy": result.best_accuracy, "seconds": result.seconds,
        "selection": {k: v for k, v in selection.items() if k != "best_keep"} or None,
        "dense_macs": float(pruner.cost.dense_macs), "budget": float(pruner.budget),
        "budget_target": str(exp.config.prune.target),
        "seeds": None if seeds is None else np.asarray(seeds).tolist(),
        "seed_evaluations": seed_evaluations,
        "candidates": result.log.to_records(dense_macs=pruner.cost.dense_macs)})
    extra = {"search_seconds": result.seconds, "proxy_accuracy": result.best_accuracy,
             "evaluated": int(result.log.filled)}
    if seed_evaluations:
        extra["seed_evaluations"] = seed_evaluations
    if selection:
        extra.update(selection_seconds=selection["seconds"],
                     selection_scores={h["stage"]: max(h["scores"]) for h in selection["stages"]})
    row = finish(exp, pruner, method, best_keep, extra=extra)
    return row, result._replace(best_keep=np.asarray(best_keep))


# ----------------------------------------------------------------------------------------------
# The whole run


def run(config, workdir: str, progress: bool = True, bars: Optional[bool] = None,
        continue_older: bool = False) -> list:
    """Runs (or resumes) the experiment of `config` in `workdir`; returns the result rows.

    progress: False prints nothing (no per-epoch lines, no table; errors still raise).
    bars: progress bars on (True) or off (False); None: only when stderr is a terminal, so a
      redirected log gets plain lines.
    continue_older: continue checkpoints made by another version of jaxprune that did not
      record every setting this one has, at the current values (see `workdir.check_workdir`)."""
    exp = experiment_lib.setup(config, workdir, progress=progress, bars=bars,
                               continue_older=continue_older)
    try:
        return _run_phases(exp)
    finally:
        ckpt_lib.unlock_workdir(exp.workdir)  # also when a phase raises (a notebook kernel lives on)


def _run_phases(exp: Experiment) -> list:
    config, workdir = exp.config, exp.workdir
    t_start = time.perf_counter()
    with _timed(exp, "dense"):
        dense_state, dense_row = dense_phase(exp)
        modelio.save_model(workdir, "unpruned", exp.model, dense_state.params,
                           dense_state.batch_stats, dataset=exp.dataset, config=config)
    rows = [dense_row]
    handset = config_checks.methods(config.prune.methods)
    searches = config_checks.methods(config.search.methods)
    if not (handset or searches):
        return _report(exp, rows, None, {}, {}, t_start)
    pruner = methods_lib.make_pruner(exp, dense_state)
    evaluate = methods_lib.candidate_evaluator(exp, pruner)  # compiled once for every method
    k = int(config.search.candidates)
    made = {}  # the hand-set keeps, made once: the hand-set phases and the seeds share them

    def keep_of(method):
        if method not in made:
            made[method] = methods_lib.handset_keep(pruner, method, evaluate, candidates=k)
        return made[method]

    for method in handset:
        with _timed(exp, method):
            rows.append(handset_phase(exp, pruner, method, keep_of(method)))
        _write(exp, rows)
    search_logs, winners = {}, {}
    if searches:
        seeds, seed_evaluations = methods_lib.search_seeds(pruner, methods_lib.seed_names(config),
                                                           keep_of)
        n_val = selection_lib.select_val_examples(config, exp.dataset.val_images.shape[0])
        validate = None if not n_val else evaluate if n_val == min(
            int(config.search.val_examples), exp.dataset.val_images.shape[0]) else \
            methods_lib.candidate_evaluator(exp, pruner, val=(0, n_val))
        # Compile the evaluator once, outside every search's clock, so the first method's
        # search_seconds is not charged for it.
        with _timed(exp, "compile candidate evaluator"):
            evaluate(np.ones((k, len(pruner.units)), np.float32))
    for method in searches:
        with _timed(exp, method):
            row, result = search_phase(exp, pruner, method, evaluate, seeds, seed_evaluations,
                                       validate)
        rows.append(row)
        search_logs[method] = {"macs": result.log.macs[result.log.rows()],
                               "accuracy": result.log.accuracy[result.log.rows()]}
        winners[method] = result.best_keep
        _write(exp, rows)
    for row in rows:
        if row["method"] in methods_lib.HANDSET_METHODS:
            winners.setdefault(row["method"], np.asarray(row["keep"]))
    return _report(exp, rows, pruner, search_logs, winners, t_start)


def _report(exp: Experiment, rows, pruner, search_logs, winners, t_start) -> list:
    """The plots, the final table, the saved models' rows and the TensorBoard summary."""
    config, workdir = exp.config, exp.workdir
    if search_logs:
        report_lib.plot_search(os.path.join(workdir, "search_pareto.png"), search_logs,
                               dense_macs=pruner.cost.dense_macs if pruner.granularity == "channel" else None,
                               budget_macs=pruner.budget if str(config.prune.target) == "macs" else None)
    if winners:
        report_lib.plot_keep_ratios(os.path.join(workdir, "keep_ratios.png"), pruner.units, winners)
    _write(exp, rows, final=True, wall=time.perf_counter() - t_start)
    merged = report_lib.read_results(workdir)
    modelio.attach_rows(workdir, merged)
    # TensorBoard: the flattened config as hparams (metrics: each method's test accuracy), the
    # table as text, the plots as images.
    exp.writer.write_summary(
        config.to_dict(), {f"accuracy/{r['method']}": r.get("accuracy") for r in merged},
        text={"results": report_lib.table_markdown(merged)},
        images={name: os.path.join(workdir, f"{name}.png")
                for name in ("search_pareto", "keep_ratios")})
    exp.writer.close()
    return rows


@contextlib.contextmanager
def _timed(exp: Experiment, phase: str):
    """Prints `[timing] <phase>: <seconds> s` (wall time of this invocation, compilation and
    checkpoint restores included) when the phase ends."""
    t0 = time.perf_counter()
    yield
    _log(exp, f"[timing] {phase}: {time.perf_counter() - t0:.1f} s")


def _write(exp: Experiment, rows, final: bool = False, wall: Optional[float] = None) -> None:
    note = (f"Model {exp.model.spec.name} on {exp.dataset.name}; MACs are multiply-accumulates per "
            f"example; latency is the median for a batch of {int(exp.config.train.eval_batch_size)} "
            f"on {jax.devices()[0].platform}; size is the bytes of the saved (compact) params; "
            f"train (s) is the dense training or the fine-tuning time.")
    # Merged by method with the table on disk: a rerun that stops early (Ctrl-C, a refused
    # phase, a damaged checkpoint) never shrinks a complete table.
    merged = report_lib.write_results(exp.workdir, rows, note)
    if final and exp.progress:
        print("\n" + report_lib.table_text(merged))
        if wall is not None:
            print(f"wall time of this invocation: {wall:.1f} s; results in {exp.workdir}/results.md")


# Errors that mean "the input is wrong" (config, data, workdir, checkpoints, a diverging recipe):
# main prints them as one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (errors.UserError, data_lib.DataNotFoundError, budget_lib.InfeasibleBudgetError,
               FloatingPointError)

# Names that notebooks, benchmarks and scripts reach through `pipeline` (each lives in the
# module named; `restore_model` / `load_predictor` are documented here in the README).
make_context, make_pruner = experiment_lib.setup, methods_lib.make_pruner
restore_model, load_predictor = modelio.restore_model, modelio.load_predictor
load_config, config_path = config_checks.load_config, config_checks.config_path
check_workdir, write_run_info = workdir_lib.check_workdir, workdir_lib.write_run_info
HANDSET_METHODS, SEED_KEEPS = methods_lib.HANDSET_METHODS, methods_lib.SEED_KEEPS
candidate_evaluator, stable_hash = methods_lib.candidate_evaluator, methods_lib.stable_hash
selection_settings = selection_lib.selection_settings
