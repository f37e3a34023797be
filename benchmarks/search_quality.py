"""Search quality: best proxy accuracy found per controller for the same number of candidates.

For one config (dataset, model, budget) the dense model is trained once (or restored from the
workdir), one `jaxprune.Pruner` is built (one set of importance scores, one budget, one
batched evaluator), and then every controller in --methods runs `search.loop.run` for every
seed in --seeds with the SAME rounds × candidates. The first quantity compared is the proxy
accuracy the pipeline itself uses to pick a winner (adaptive BN on calibration batches of the
training split, accuracy on the first `search.val_examples` validation images). With
`--set search.select_top=N` (and `select_val_examples`, `select_finetune`, `select_epochs`)
each run's winner is picked by the pipeline's successive halving over its log
(`pipeline.select_winner`), the same stages for every method. With --finetune every winner is
fine-tuned on one data order per seed and judged on test and on the validation images that
neither the proxy nor the selection scored; the paired differences against --reference and
the proxy's rank correlation with the fine-tuned accuracy are what settle a comparison.

    python benchmarks/search_quality.py --config configs/quickstart.py --workdir runs/sq_digits \\
        --out results.json --name quickstart --plot search_quality.png
    TFDS_DATA_DIR=... python benchmarks/search_quality.py --config configs/cifar10.py \\
        --variant cpu --workdir runs/sq_cifar --rounds 6 --candidates 16 \\
        --set search.chunk_size=4 --holdout 2000 --out results.json --name cifar10_cpu

The search key of (method, seed) is `fold_in(key(seed), hash(method))`; the dense model and
the calibration batches come from `config.seed` and are shared by every run, so the spread
over seeds is the spread of the search alone. Each (method, seed) search checkpoints under
`workdir/checkpoints/search_quality/...`, so running the same command again resumes (and a
finished study only re-reads its logs).

Prints, per method: mean ± std (sample std, ddof=1) over seeds of the best proxy accuracy, the
per-seed values, candidates evaluated, distinct candidates, the round the best was first
found, the last round's mean accuracy and the search seconds. With --holdout N, each run's
winner is also re-scored on N *other* validation images (from `unseen_start`),
which shows how much of a "best" is the selection of a lucky candidate on a small set.

--out stores the study under --name in a JSON file (other names already there are kept), and
--plot draws best-so-far proxy accuracy vs evaluated candidates (mean over seeds, ± std
shaded), one panel per study in that file.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
import types


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file, e.g. configs/quickstart.py")
    parser.add_argument("--variant", default="", help="get_config(arg): '' or e.g. 'cpu'")
    parser.add_argument("--workdir",
                        help="dense checkpoint and per-search checkpoints (reused across runs)")
    parser.add_argument("--reanalyse", action="store_true",
                        help="run nothing: recompute the statistics of study --name stored in --out "
                             "(e.g. with other --reference / --resamples), print, store and plot")
    parser.add_argument("--dense_params", default=None,
                        help=".npz of the trained dense model (experiments/gpu/pack.py writes "
                             "dense_params.npz after a GPU run); default: train it in --workdir")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="reinforce,gan,evolution,random,uniform")
    parser.add_argument("--rounds", type=int, default=None, help="default: config.search.rounds")
    parser.add_argument("--candidates", type=int, default=None,
                        help="per round; default: config.search.candidates")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of the budget target removed; default: config.prune.sparsity")
    parser.add_argument("--lower", type=float, default=None,
                        help="smallest keep ratio of a group; default: config.search.lower")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. search.val_examples=500 (repeatable); a key "
                             "missing from the config is added")
    parser.add_argument("--holdout", type=int, default=0,
                        help="re-score each winner on this many further validation images (0: off)")
    parser.add_argument("--finetune", action="store_true",
                        help="fine-tune every run's winner (finetune.* of the config; the same data "
                             "order for every method of a seed) and judge it on the validation "
                             "images the search never saw and on the test split")
    parser.add_argument("--reference", default="random",
                        help="paired differences (same seeds) of every other method against this one")
    parser.add_argument("--resamples", type=int, default=10000,
                        help="bootstrap resamples of the paired intervals")
    parser.add_argument("--out", default=None, help="JSON file to store the study in")
    parser.add_argument("--name", default=None, help="key of this study in --out (default: config stem)")
    parser.add_argument("--plot", default=None, help="PNG: best-so-far curves of every study in --out")
    parser.add_argument("--no_resume", action="store_true",
                        help="no per-search checkpoints (nothing resumes; nothing is written for them)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.reanalyse and not (args.out and args.name):
        parser.error("--reanalyse needs --out FILE and --name STUDY (the study to re-read)")
    if not args.reanalyse and not (args.config and args.workdir):
        parser.error("--config and --workdir are required (unless --reanalyse)")
    return args


# ----------------------------------------------------------------------------------------------
# Config


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, pairs) -> None:
    """`key.sub=value` pairs into a ConfigDict (values parsed as Python literals, else strings)."""
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. search.val_examples=500.")
        dotted, text = pair.split("=", 1)
        *parents, leaf = dotted.strip().split(".")
        node = config
        for name in parents:
            if name not in node:
                raise ValueError(f"--set {pair!r}: the config has no section {name!r}.")
            node = node[name]
        with node.unlocked():
            node[leaf] = _literal(text)


def load_config(args):
    from jaxprune import pipeline

    config = pipeline.load_config(args.config, args.variant or None)
    apply_overrides(config, args.set)
    fixed = {"search.rounds": args.rounds, "search.candidates": args.candidates,
             "prune.sparsity": args.sparsity, "search.lower": args.lower}
    apply_overrides(config, [f"{k}={v!r}" for k, v in fixed.items() if v is not None])
    with config.unlocked():
        config.search.methods = ""  # the study runs the controllers itself
        config.prune.methods = ""
    return config


# ----------------------------------------------------------------------------------------------
# One study


def _settings(config, method: str, seed: int) -> dict:
    s, p = config.search, config.prune
    return {"method": method, "seed": int(seed), "rounds": int(s.rounds),
            "candidates": int(s.candidates), "sparsity": float(p.sparsity),
            "target": str(p.target), "criterion": str(p.criterion),
            "granularity": str(p.granularity), "lower": float(s.lower), "step": float(s.step),
            "val_examples": int(s.val_examples), "calib_batches": int(s.calib_batches),
            "calib_batch_size": int(s.calib_batch_size)}


def _run_dir(settings: dict, prefix: str = "") -> str:
    """The checkpoint folder of one search (`prefix` "ft_": of its winner's fine-tune), named by
    the settings that change it, so studies at other budgets share a workdir without clashing."""
    return (f"search_quality/{prefix}{settings['method']}_seed{settings['seed']}"
            f"_r{settings['rounds']}k{settings['candidates']}_sp{settings['sparsity']:g}"
            f"_lo{settings['lower']:g}_v{settings['val_examples']}")


def unseen_start(ctx) -> int:
    """The first validation image that neither the search's proxy (`search.val_examples`) nor
    the selection (`search.select_*`) scored."""
    from jaxprune import selection

    return max(int(ctx.config.search.val_examples),
               selection.select_val_examples(ctx.config, ctx.dataset.val_images.shape[0]))


def selection_suffix(config) -> str:
    """Names the selection settings in the fine-tunes' folders ('' when selection is off), so a
    winner picked another way is never restored from another study's fine-tune."""
    from jaxprune import selection

    s = selection.selection_settings(config)
    return (f"_sel{s['select_top']}v{s['select_val_examples']}f{s['select_finetune']}"
            f"e{s['select_epochs']}") if s else ""


def holdout_evaluator(ctx, pruner, n: int):
    """The pipeline's evaluator, built on `n` validation images from `unseen_start`."""
    from jaxprune import pipeline

    ds = ctx.dataset
    start = unseen_start(ctx)
    n = min(int(n), ds.val_images.shape[0] - start)
    if n < 1:
        print(f"--holdout: no validation images beyond the first {start} "
              f"(the split has {ds.val_images.shape[0]}); skipped.", flush=True)
        return None, 0
    return pipeline.candidate_evaluator(ctx, pruner, val=(start, n)), n


def run_study(args, config) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxprune import experiment, modelio, pipeline, selection
    from jaxprune.search import controllers as controllers_lib
    from jaxprune.search import loop as loop_lib

    t_study = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        controllers_lib.get_controller(m)  # unknown names fail before any training
    rounds, k = int(config.search.rounds), int(config.search.candidates)
    progress = not args.quiet

    ctx = pipeline.make_context(config, args.workdir, progress=progress)
    t0 = time.perf_counter()
    if args.dense_params:
        params, batch_stats = modelio.load_dense_params(args.dense_params, ctx.model)
        dense_state = types.SimpleNamespace(params=params, batch_stats=batch_stats)
        dense_row = ctx.evaluate(params, batch_stats, ctx.test)
    else:
        dense_state, dense_row = pipeline.dense_phase(ctx)
    dense_seconds = time.perf_counter() - t0
    pruner = pipeline.make_pruner(ctx, dense_state)
    evaluate_fn = pipeline.candidate_evaluator(ctx, pruner)
    g = len(pruner.units)

    # References (and the evaluator's compilation, so no method pays it inside its search).
    ref_keep = np.stack([np.ones((g,), np.float32), pruner.project(np.ones((g,), np.float32))])
    t0 = time.perf_counter()
    np.asarray(evaluate_fn(np.repeat(ref_keep[1:], k, axis=0)))
    compile_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_acc = np.asarray(evaluate_fn(np.repeat(ref_keep[1:], k, axis=0)))
    round_seconds = time.perf_counter() - t0  # one round's evaluation, warm
    dense_proxy = float(np.asarray(evaluate_fn(np.repeat(ref_keep[:1], k, axis=0)))[0])
    uniform_proxy = float(ref_acc[0])
    macs_fraction = lambda keep: float(pruner.cost.macs(jnp.asarray(keep))) / pruner.cost.dense_macs
    print(f"\n{ctx.model.spec.name} on {ctx.dataset.name}: dense test accuracy "
          f"{100 * dense_row['accuracy']:.2f} %, dense proxy accuracy {100 * dense_proxy:.2f} %; "
          f"uniform keep at the budget ({100 * macs_fraction(ref_keep[1]):.1f} % of MACs): proxy "
          f"{100 * uniform_proxy:.2f} %. Evaluator: compile+first call {compile_seconds:.1f} s, "
          f"one round of {k} candidates {round_seconds:.2f} s.", flush=True)

    select = selection_suffix(config)
    validate = pipeline.candidate_evaluator(ctx, pruner, val=(0, selection.select_val_examples(
        config, ctx.dataset.val_images.shape[0]))) if select else None  # compiled once
    held_fn, n_held = (holdout_evaluator(ctx, pruner, args.holdout) if args.holdout else (None, 0))
    fine_tune, n_unseen = finetuner(ctx, pruner) if args.finetune else (None, 0)
    uniform = {"keep": [round(float(v), 5) for v in ref_keep[1]],
               "proxy_accuracy": uniform_proxy, "macs_fraction": macs_fraction(ref_keep[1])}
    if fine_tune is not None:  # the uniform control is one architecture: one fine-tune
        uniform["finetuned"] = fine_tune(ref_keep[1], seeds[0], _run_dir(
            _settings(config, "uniform", seeds[0]), prefix="ft_"))

    def study_so_far(runs) -> dict:
        done = sorted({r["seed"] for r in runs if all(
            any(q["seed"] == r["seed"] and q["method"] == m for q in runs) for m in methods)})
        return {
            "config": args.config, "variant": args.variant, "overrides": args.set,
            "dense_params": args.dense_params,
            "model": ctx.model.spec.name, "dataset": ctx.dataset.name,
            "seeds": done, "complete": done == seeds, "methods": methods,
            "rounds": rounds, "candidates_per_round": k,
            "evaluated_per_run": rounds * k, "sparsity": float(config.prune.sparsity),
            "target": str(config.prune.target), "lower": float(config.search.lower),
            "val_examples": int(min(int(config.search.val_examples), ctx.dataset.val_images.shape[0])),
            "holdout_examples": n_held, "unseen_val_examples": n_unseen,
            "selection": selection.selection_settings(config) or None,
            "finetune": {"epochs": int(config.finetune.epochs),
                         "learning_rate": float(config.finetune.learning_rate),
                         "train_examples": int(ctx.dataset.train_images.shape[0])}
            if fine_tune is not None else None,
            "units": pruner.units,
            "dense_test_accuracy": float(dense_row["accuracy"]), "dense_proxy_accuracy": dense_proxy,
            "uniform_at_budget": uniform,
            "budget_macs_fraction": pruner.budget / pruner.cost.dense_macs
            if str(config.prune.target) == "macs" else None,
            "dense_seconds": dense_seconds, "evaluator_compile_seconds": compile_seconds,
            "evaluation_seconds_per_round": round_seconds,
            "devices": [str(d) for d in jax.devices()],
            **analyse(runs, methods, rounds, k, args.reference, args.resamples),
            "runs": runs, "wall_seconds": time.perf_counter() - t_study,
        }

    runs = []
    controllers = {m: controllers_lib.get_controller(m) for m in methods}
    for seed in seeds:  # seeds outer: a study stopped early still holds whole pairs
        for method in methods:
            settings = _settings(config, method, seed)
            checkpointer = None if args.no_resume else experiment.checkpointer(
                ctx, _run_dir(settings), extra=settings)
            saved = None if checkpointer is None else checkpointer.latest_step()
            key = jax.random.fold_in(jax.random.key(seed), pipeline.stable_hash(method))
            t0 = time.perf_counter()
            result = loop_lib.run(
                controllers[method], pruner.space, key=key, rounds=rounds, k=k,
                evaluate_fn=evaluate_fn, macs_fn=pruner.cost.macs, params_fn=pruner.cost.params,
                budget=pruner.budget, budget_fn=pruner.budget_fn, checkpointer=checkpointer,
                name=f"{method}/{seed}", progress=progress)
            wall = time.perf_counter() - t0
            log = result.log
            n = int(log.filled)
            acc = np.asarray(log.accuracy[:n], np.float64)
            best = log.best()
            last = log.round[:n] == rounds - 1
            run = {"method": method, "seed": seed, "best_accuracy": float(acc[best]),
                   "best_round": int(log.round[best]), "best_index": int(best),
                   "last_round_mean": float(acc[last].mean()),
                   "first_round_mean": float(acc[log.round[:n] == 0].mean()),
                   "evaluated": n,
                   "distinct": int(np.unique(np.round(log.keep[:n], 4), axis=0).shape[0]),
                   "best_keep": [round(float(v), 5) for v in log.keep[best]],
                   "best_macs_fraction": float(log.macs[best]) / pruner.cost.dense_macs,
                   "search_seconds": float(result.seconds), "wall_seconds": float(wall),
                   # > 0: rounds before it were restored from a checkpoint (wall covers the rest).
                   "resumed_at_round": 0 if saved is None else int(saved) + 1,
                   "best_so_far": np.maximum.accumulate(acc).round(5).tolist()}
            winner = log.keep[best]
            if select:  # successive halving over the log, the same stages for every method
                picked = pipeline.select_winner(
                    ctx, pruner, _run_dir(settings).split("/", 1)[1] + select, log, validate)
                winner = picked["best_keep"]
                run.update(selected_keep=[round(float(v), 5) for v in winner],
                           selection_score=max(picked["stages"][-1]["scores"]),
                           selection_seconds=float(picked["seconds"]),
                           selection=picked["stages"])
            if held_fn is not None:
                run["holdout_accuracy"] = float(np.asarray(held_fn(winner[None]))[0])
            if fine_tune is not None:
                run["finetuned"] = fine_tune(winner, seed, _run_dir(settings, prefix="ft_") + select)
            runs.append(run)
            ft = run.get("finetuned", {})
            print(f"  {method:<10} seed {seed}: best {100 * run['best_accuracy']:.2f} % "
                  f"(round {run['best_round']}), last-round mean "
                  f"{100 * run['last_round_mean']:.2f} %, {run['distinct']} distinct"
                  + (f", selected {100 * run['selection_score']:.2f} %" if select else "")
                  + (f", holdout {100 * run['holdout_accuracy']:.2f} %" if held_fn else "")
                  + ("; fine-tuned:" + (f" unseen val {100 * ft['unseen_val_accuracy']:.2f} %,"
                                        if "unseen_val_accuracy" in ft else "")
                     + f" test {100 * ft['test_accuracy']:.2f} %" if ft else "")
                  + f", {time.perf_counter() - t0:.1f} s", flush=True)
        if args.out:  # after every seed, so an interrupted study keeps its finished pairs
            store(args.out, study_name(args), study_so_far(runs))

    study = study_so_far(runs)
    ctx.writer.close()
    return study


def finetuner(ctx, pruner):
    """(fine_tune(keep, seed, phase) -> dict, unseen): the configured fine-tune (`finetune.*`) of
    the dense model under `keep`'s masks, a checkpointed phase. Its data order depends on the
    study seed only, so every method's winner of one seed is trained on the same batches (the
    pairing of the comparison). Judged on the validation images neither the search nor the
    selection scored (`val[unseen_start:]`, `unseen` of them) and on the test split."""
    import jax
    import numpy as np

    from jaxprune import experiment, pipeline

    ds = ctx.dataset
    start = min(unseen_start(ctx), ds.val_images.shape[0])
    unseen = ds.val_images.shape[0] - start
    evaluate = ctx.evaluate
    held = experiment.val_images(ctx, start, unseen) if unseen > 0 else None

    def fine_tune(keep, seed: int, phase: str) -> dict:
        masks = pruner.masks(np.asarray(keep, np.float32))[0]
        state, seconds = pipeline.finetune_phase(
            ctx, pruner, phase, masks, pruner.params,
            key=jax.random.fold_in(ctx.keys["finetune"], int(seed)))
        out = {"test_accuracy": evaluate(state.params, state.batch_stats, ctx.test)["accuracy"],
               "train_seconds": float(seconds)}
        if held is not None:
            out["unseen_val_accuracy"] = evaluate(state.params, state.batch_stats, held)["accuracy"]
        return out

    return fine_tune, unseen


def study_name(args) -> str:
    return args.name or os.path.splitext(os.path.basename(args.config))[0] + (
        f"_{args.variant}" if args.variant else "")


# ----------------------------------------------------------------------------------------------
# Statistics

# (label, how to read a run's value): what the paired comparison covers, when present.
METRICS = (("best proxy", lambda r: r["best_accuracy"]),
           ("selection score", lambda r: r.get("selection_score")),
           ("proxy on holdout", lambda r: r.get("holdout_accuracy")),
           ("fine-tuned, unseen val", lambda r: r.get("finetuned", {}).get("unseen_val_accuracy")),
           ("fine-tuned, test", lambda r: r.get("finetuned", {}).get("test_accuracy")))
TRUTH = "fine-tuned, test"  # what the scores before it are judged against
_METRIC = dict(METRICS)


def paired_difference(a, b, resamples: int = 10000, seed: int = 0) -> dict:
    """Paired a - b over seeds: mean, percentile-bootstrap and Student-t 95 % intervals of the
    mean, the two-sided Wilcoxon signed-rank p (exact for small n; 1.0 when every difference is 0) and
    wins / ties / losses."""
    import numpy as np
    from scipy import stats

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.size < 2:
        raise ValueError(f"a paired interval needs at least 2 seeds, got {d.size}.")
    means = d[np.random.default_rng(seed).integers(0, d.size, (int(resamples), d.size))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    p = float(stats.wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
    return {"n": int(d.size), "mean": float(d.mean()), "ci95": [float(lo), float(hi)],
            # Student-t interval: wider than the percentile bootstrap, which undercovers at
            # ten or fewer pairs.
            "t95": [float(d.mean() - half), float(d.mean() + half)],
            "wilcoxon_p": p, "wins": int(np.sum(d > 0)), "ties": int(np.sum(d == 0)),
            "losses": int(np.sum(d < 0))}


def proxy_fidelity(runs, resamples: int) -> dict:
    """Rank correlation (Spearman, Kendall, bootstrap 95 % intervals) over every run's winner
    between its proxy scores and its fine-tuned test accuracy: how well the proxy orders the
    candidates a search actually picks."""
    import numpy as np
    from proxy_fidelity import rank_correlations

    truth = [_METRIC[TRUTH](r) for r in runs]
    out = {}
    if len(runs) < 4 or any(t is None for t in truth):
        return out
    for label, value in METRICS:
        if label == TRUTH:
            continue
        proxy = [value(r) for r in runs]
        if all(p is not None for p in proxy) and np.ptp(proxy) > 0 and np.ptp(truth) > 0:
            out[label] = dict(rank_correlations(proxy, truth, resamples, seed=0), n=len(runs))
    return out


def paired_table(runs, methods, reference: str, resamples: int) -> dict:
    """{method: {metric: paired_difference(method, reference)}} over the seeds both finished."""
    if reference not in methods:
        return {}
    by = {(r["method"], r["seed"]): r for r in runs}
    out = {}
    for method in methods:
        if method == reference:
            continue
        seeds = sorted(s for (m, s) in by if m == method and (reference, s) in by)
        rows = {}
        for label, value in METRICS:
            pairs = [(value(by[method, s]), value(by[reference, s])) for s in seeds]
            if len(pairs) >= 2 and all(a is not None and b is not None for a, b in pairs):
                rows[label] = paired_difference(*zip(*pairs), resamples=resamples)
        if rows:
            out[method] = {"reference": reference, "seeds": seeds, **rows}
    return out


def analyse(runs, methods, rounds: int, k: int, reference: str, resamples: int) -> dict:
    """What a study derives from its runs: the per-method summary, the paired differences
    against `reference` and the proxy's rank correlation with the fine-tuned accuracy."""
    return {"summary": summarize(runs, methods, rounds, k),
            "paired": paired_table(runs, methods, reference, resamples),
            "proxy_vs_finetuned": proxy_fidelity(runs, min(resamples, 2000))}


def checkpoints(rounds: int, k: int) -> list:
    """Candidate counts at which best-so-far is reported: 1 round, ~1/4, ~1/2, all rounds."""
    return sorted({k * r for r in (1, max(rounds // 4, 1), max(rounds // 2, 1), rounds)})


def summarize(runs, methods, rounds: int, k: int) -> dict:
    import numpy as np

    out = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        best = np.asarray([r["best_accuracy"] for r in mine], np.float64)
        curves = np.asarray([r["best_so_far"] for r in mine], np.float64)
        at = {str(n): [float(curves[:, n - 1].mean()),
                       float(curves[:, n - 1].std(ddof=1)) if len(mine) > 1 else 0.0]
              for n in checkpoints(rounds, k)}
        row = {"best_mean": float(best.mean()),
               "best_std": float(best.std(ddof=1)) if best.size > 1 else 0.0,
               "best_per_seed": best.round(5).tolist(),
               "best_round_per_seed": [r["best_round"] for r in mine],
               "best_so_far_at": at,  # candidates evaluated -> [mean, std] over seeds
               "last_round_mean": float(np.mean([r["last_round_mean"] for r in mine])),
               "distinct_mean": float(np.mean([r["distinct"] for r in mine])),
               "evaluated": mine[0]["evaluated"] if mine else 0,
               "search_seconds": float(np.sum([r["search_seconds"] for r in mine])),
               "wall_seconds": float(np.sum([r["wall_seconds"] for r in mine]))}
        for name, value in (("holdout", lambda r: r.get("holdout_accuracy")),
                            ("ft_unseen", _METRIC["fine-tuned, unseen val"]),
                            ("ft_test", _METRIC[TRUTH])):
            vals = [value(r) for r in mine]
            if vals and all(v is not None for v in vals):
                vals = np.asarray(vals, np.float64)
                row[f"{name}_mean"] = float(vals.mean())
                row[f"{name}_std"] = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
        out[method] = row
    return out


def _markdown(head, lines) -> list:
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(c) for c in lines]


def table_text(study: dict) -> str:
    """Markdown: the per-method summary, then best-so-far after n candidates."""
    pm = lambda mean, std: f"{100 * mean:.2f} ± {100 * std:.2f}"
    summary = study["summary"]
    extra = [(key, label) for key, label in (
        ("holdout", "winner on holdout (%)"), ("ft_unseen", "fine-tuned, unseen val (%)"),
        ("ft_test", "fine-tuned, test (%)")) if all(f"{key}_mean" in r for r in summary.values())]
    head = ["method", "best proxy (%)", "per seed (%)", "best round", "last-round mean (%)",
            "distinct", "evaluated", "search (s)"] + [label for _, label in extra]
    lines = []
    for method, r in summary.items():
        cells = [method, pm(r["best_mean"], r["best_std"]),
                 " / ".join(f"{100 * v:.2f}" for v in r["best_per_seed"]),
                 " / ".join(str(v) for v in r["best_round_per_seed"]),
                 f"{100 * r['last_round_mean']:.2f}", f"{r['distinct_mean']:.0f}",
                 str(r["evaluated"]), f"{r['search_seconds']:.0f}"]
        cells += [pm(r[f"{key}_mean"], r[f"{key}_std"]) for key, _ in extra]
        lines.append(cells)
    counts = list(next(iter(summary.values()))["best_so_far_at"])
    head2 = ["method"] + [f"after {n} (%)" for n in counts]
    lines2 = [[m] + [pm(*r["best_so_far_at"][n]) for n in counts] for m, r in summary.items()]
    text = _markdown(head, lines) + [
        "", "Best proxy accuracy so far after n candidates (mean ± std over seeds):", ""] + _markdown(
        head2, lines2)
    fidelity = study.get("proxy_vs_finetuned") or {}
    if fidelity:
        text += ["", "Rank correlation of each score with the fine-tuned test accuracy, over every "
                 "run's winner (bootstrap 95 % intervals):", ""] + _markdown(
            ["score", "winners", "Spearman", "Kendall"],
            [[label, str(c["n"]), f"{c['spearman']:+.2f} [{c['spearman_ci'][0]:+.2f}, "
              f"{c['spearman_ci'][1]:+.2f}]", f"{c['kendall']:+.2f} [{c['kendall_ci'][0]:+.2f}, "
              f"{c['kendall_ci'][1]:+.2f}]"] for label, c in fidelity.items()])
    paired = study.get("paired") or {}
    if paired:
        ref = next(iter(paired.values()))["reference"]
        rows = [[method, label, str(d["n"]), f"{100 * d['mean']:+.2f}",
                 f"[{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]",
                 f"[{100 * d['t95'][0]:+.2f}, {100 * d['t95'][1]:+.2f}]" if "t95" in d else "",
                 f"{d['wilcoxon_p']:.3f}", f"{d['wins']}/{d['ties']}/{d['losses']}"]
                for method, p in paired.items() for label, _ in METRICS if label in p
                for d in [p[label]]]
        text += ["", f"Paired differences against {ref} (same seeds; points; 95 % intervals of "
                 "the mean: percentile bootstrap and Student t; two-sided Wilcoxon signed-rank):",
                 ""] + _markdown(
            ["method", "measured on", "seeds", f"mean - {ref}", "bootstrap 95 %", "t 95 %",
             "Wilcoxon p", "wins/ties/losses"], rows)
    return "\n".join(text)


# ----------------------------------------------------------------------------------------------
# Output


def store(path: str, name: str, study: dict) -> dict:
    everything = {}
    if os.path.exists(path):
        with open(path) as f:
            everything = json.load(f)
    everything[name] = study
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(everything, f, indent=1)
    os.replace(tmp, path)
    return everything


def _target_name(target: str) -> str:
    return {"macs": "MACs"}.get(target, target)


def plot(path: str, studies: dict) -> None:
    """Per study: best-so-far proxy accuracy vs evaluated candidates (mean over seeds, 95 %
    t-interval of the mean shaded) and, where winners were fine-tuned, each method's paired
    test-accuracy difference to the reference per seed (dots) with the Student-t 95 % interval
    of its mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy import stats

    panels = [(name, kind) for name, study in studies.items()
              for kind in ("curve", "paired") if kind == "curve" or study.get("paired")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (name, kind) in zip(axes[0], panels):
        study = studies[name]
        title = (f"{study['model']} / {study['dataset']}: {100 * study['sparsity']:.0f} % "
                 f"{_target_name(study['target'])} removed\n{len(study['seeds'])} seeds, "
                 f"{study['rounds']}×{study['candidates_per_round']} candidates, "
                 f"{study['val_examples']} val images")
        if kind == "paired":
            _plot_paired(ax, study)
            ax.set_title(title, fontsize=9)
            continue
        for i, method in enumerate(study["methods"]):
            curves = np.asarray([r["best_so_far"] for r in study["runs"] if r["method"] == method
                                 and r["seed"] in study["seeds"]], np.float64) * 100
            x = np.arange(1, curves.shape[1] + 1)
            mean = curves.mean(0)
            ax.plot(x, mean, color=f"C{i}", lw=1.4, label=method)
            if curves.shape[0] > 1:
                half = stats.t.ppf(0.975, curves.shape[0] - 1) * curves.std(0, ddof=1) / np.sqrt(
                    curves.shape[0])
                ax.fill_between(x, np.clip(mean - half, 0, 100), np.clip(mean + half, 0, 100),
                                color=f"C{i}", alpha=0.15, lw=0)
        ax.axhline(100 * study["uniform_at_budget"]["proxy_accuracy"], color="grey", ls=":", lw=1,
                   label="uniform keep at budget")
        ax.set_xscale("log")
        ax.set_xlabel("candidates evaluated")
        ax.set_ylabel("best proxy accuracy so far (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_paired(ax, study: dict) -> None:
    import numpy as np

    label = TRUTH if any(TRUTH in p for p in study["paired"].values()) else METRICS[0][0]
    value = _METRIC[label]
    by = {(r["method"], r["seed"]): r for r in study["runs"]}
    for i, (method, p) in enumerate(study["paired"].items()):
        if label not in p:
            continue
        d = p[label]
        diffs = [100 * (value(by[method, s]) - value(by[p["reference"], s])) for s in p["seeds"]]
        jitter = np.linspace(-0.12, 0.12, len(diffs))
        ax.scatter(i + jitter, diffs, s=10, color="grey", alpha=0.6, zorder=2)
        lo, hi = d.get("t95", d["ci95"])
        ax.errorbar(i, 100 * d["mean"], yerr=[[100 * (d["mean"] - lo)], [100 * (hi - d["mean"])]],
                    fmt="o", color=f"C{study['methods'].index(method)}", capsize=4, zorder=3)
    ax.axhline(0, color="black", lw=0.8)
    names = list(study["paired"])
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylabel(f"{label}: method − {next(iter(study['paired'].values()))['reference']} (points)")
    ax.grid(alpha=0.3, axis="y")


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO

    if args.reanalyse:
        with open(args.out) as f:
            stored = json.load(f)
        if args.name not in stored:
            raise SystemExit(f"--reanalyse: {args.out} holds no study {args.name!r} (it holds "
                             f"{', '.join(map(repr, stored)) or 'none'}).")
        study = stored[args.name]
        runs = [r for r in study["runs"] if r["seed"] in study["seeds"]]
        study.update(analyse(runs, study["methods"], study["rounds"],
                             study["candidates_per_round"], args.reference, args.resamples))
    else:
        study = run_study(args, load_config(args))
    print(f"\n{study['model']} on {study['dataset']}, {100 * study['sparsity']:.0f} % "
          f"{_target_name(study['target'])} removed, {study['rounds']} rounds × "
          f"{study['candidates_per_round']} candidates, seeds {study['seeds']}, "
          f"{study['val_examples']} val images; std over seeds (ddof=1).")
    print(table_text(study))
    uniform = study["uniform_at_budget"]
    print(f"dense proxy {100 * study['dense_proxy_accuracy']:.2f} %, uniform keep at budget "
          f"{100 * uniform['proxy_accuracy']:.2f} %"
          + (f" (fine-tuned: test {100 * uniform['finetuned']['test_accuracy']:.2f} %)"
             if "finetuned" in uniform else "") + "; study wall time "
          f"{study['wall_seconds']:.0f} s (dense phase {study['dense_seconds']:.0f} s).")
    if args.out:
        name = study_name(args)
        everything = store(args.out, name, study)
        print(f"stored as {name!r} in {args.out}")
        if args.plot:
            plot(args.plot, everything)
            print(f"plot: {args.plot}")
    elif args.plot:
        plot(args.plot, {"study": study})


if __name__ == "__main__":
    sys.exit(main())
