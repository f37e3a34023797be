"""Search quality: best proxy accuracy found per controller for the same number of candidates.

For one config (dataset, model, budget) the dense model is trained once (or restored from the
workdir), one `jaxprune.Pruner` is built (one set of importance scores, one budget, one
batched evaluator), and then every controller in --methods runs `search.loop.run` for every
seed in --seeds with the SAME rounds × candidates. No fine-tuning: the quantity compared is
the proxy accuracy the pipeline itself uses to pick a winner (adaptive BN on calibration
batches of the training split, accuracy on the first `search.val_examples` validation images).

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
winner is also re-scored on N *other* validation images (`val[val_examples:val_examples+N]`),
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config file, e.g. configs/quickstart.py")
    parser.add_argument("--variant", default="", help="get_config(arg): '' or e.g. 'cpu'")
    parser.add_argument("--workdir", required=True,
                        help="dense checkpoint and per-search checkpoints (reused across runs)")
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
    parser.add_argument("--out", default=None, help="JSON file to store the study in")
    parser.add_argument("--name", default=None, help="key of this study in --out (default: config stem)")
    parser.add_argument("--plot", default=None, help="PNG: best-so-far curves of every study in --out")
    parser.add_argument("--no_resume", action="store_true",
                        help="no per-search checkpoints (nothing resumes; nothing is written for them)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


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


def _run_dir(settings: dict) -> str:
    return (f"search_quality/{settings['method']}_seed{settings['seed']}"
            f"_r{settings['rounds']}k{settings['candidates']}_sp{settings['sparsity']:g}"
            f"_lo{settings['lower']:g}_v{settings['val_examples']}")


def holdout_evaluator(ctx, pruner, n: int):
    """The pipeline's evaluator, built on validation images [val_examples, val_examples + n)."""
    from jaxprune import pipeline

    ds = ctx.dataset
    start = int(ctx.config.search.val_examples)
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

    from jaxprune import pipeline
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

    held_fn, n_held = (holdout_evaluator(ctx, pruner, args.holdout) if args.holdout else (None, 0))

    runs = []
    for method in methods:
        controller = controllers_lib.get_controller(method)
        for seed in seeds:
            settings = _settings(config, method, seed)
            checkpointer = None if args.no_resume else ctx.checkpointer(_run_dir(settings), extra=settings)
            saved = None if checkpointer is None else checkpointer.latest_step()
            key = jax.random.fold_in(jax.random.key(seed), pipeline._stable_hash(method))
            t0 = time.perf_counter()
            result = loop_lib.run(
                controller, pruner.space, key=key, rounds=rounds, k=k, evaluate_fn=evaluate_fn,
                macs_fn=pruner.cost.macs, params_fn=pruner.cost.params, budget=pruner.budget,
                budget_fn=pruner.budget_fn, checkpointer=checkpointer, name=f"{method}/{seed}",
                progress=progress)
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
            if held_fn is not None:
                run["holdout_accuracy"] = float(np.asarray(held_fn(log.keep[best][None]))[0])
            runs.append(run)
            print(f"  {method:<10} seed {seed}: best {100 * run['best_accuracy']:.2f} % "
                  f"(round {run['best_round']}), last-round mean "
                  f"{100 * run['last_round_mean']:.2f} %, {run['distinct']} distinct"
                  + (f", holdout {100 * run['holdout_accuracy']:.2f} %" if held_fn else "")
                  + f", {wall:.1f} s", flush=True)

    study = {
        "config": args.config, "variant": args.variant, "overrides": args.set,
        "model": ctx.model.spec.name, "dataset": ctx.dataset.name,
        "seeds": seeds, "methods": methods, "rounds": rounds, "candidates_per_round": k,
        "evaluated_per_run": rounds * k, "sparsity": float(config.prune.sparsity),
        "target": str(config.prune.target), "lower": float(config.search.lower),
        "val_examples": int(min(int(config.search.val_examples), ctx.dataset.val_images.shape[0])),
        "holdout_examples": n_held, "units": pruner.units,
        "dense_test_accuracy": float(dense_row["accuracy"]), "dense_proxy_accuracy": dense_proxy,
        "uniform_at_budget": {"keep": [round(float(v), 5) for v in ref_keep[1]],
                              "proxy_accuracy": uniform_proxy,
                              "macs_fraction": macs_fraction(ref_keep[1])},
        "budget_macs_fraction": pruner.budget / pruner.cost.dense_macs
        if str(config.prune.target) == "macs" else None,
        "dense_seconds": dense_seconds, "evaluator_compile_seconds": compile_seconds,
        "evaluation_seconds_per_round": round_seconds,
        "devices": [str(d) for d in jax.devices()],
        "summary": summarize(runs, methods, rounds, k), "runs": runs,
        "wall_seconds": time.perf_counter() - t_study,
    }
    ctx.writer.close()
    return study


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
        if mine and "holdout_accuracy" in mine[0]:
            held = np.asarray([r["holdout_accuracy"] for r in mine], np.float64)
            row["holdout_mean"] = float(held.mean())
            row["holdout_std"] = float(held.std(ddof=1)) if held.size > 1 else 0.0
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
    held = any("holdout_mean" in r for r in summary.values())
    head = ["method", "best proxy (%)", "per seed (%)", "best round", "last-round mean (%)",
            "distinct", "evaluated", "search (s)"] + (["winner on holdout (%)"] if held else [])
    lines = []
    for method, r in summary.items():
        cells = [method, pm(r["best_mean"], r["best_std"]),
                 " / ".join(f"{100 * v:.2f}" for v in r["best_per_seed"]),
                 " / ".join(str(v) for v in r["best_round_per_seed"]),
                 f"{100 * r['last_round_mean']:.2f}", f"{r['distinct_mean']:.0f}",
                 str(r["evaluated"]), f"{r['search_seconds']:.0f}"]
        if held:
            cells.append(pm(r["holdout_mean"], r["holdout_std"]))
        lines.append(cells)
    counts = list(next(iter(summary.values()))["best_so_far_at"])
    head2 = ["method"] + [f"after {n} (%)" for n in counts]
    lines2 = [[m] + [pm(*r["best_so_far_at"][n]) for n in counts] for m, r in summary.items()]
    return "\n".join(_markdown(head, lines) + [
        "", "Best proxy accuracy so far after n candidates (mean ± std over seeds):", ""]
        + _markdown(head2, lines2))


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
    """Best-so-far proxy accuracy vs evaluated candidates: mean over seeds, ± std shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(studies)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        study = studies[name]
        for i, method in enumerate(study["methods"]):
            curves = np.asarray([r["best_so_far"] for r in study["runs"] if r["method"] == method],
                                np.float64) * 100
            x = np.arange(1, curves.shape[1] + 1)
            mean, std = curves.mean(0), curves.std(0, ddof=1) if curves.shape[0] > 1 else 0 * curves[0]
            ax.plot(x, mean, color=f"C{i}", lw=1.4, label=method)
            ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.15, lw=0)
        ax.axhline(100 * study["uniform_at_budget"]["proxy_accuracy"], color="grey", ls=":", lw=1,
                   label="uniform keep at budget")
        ax.set_xscale("log")
        ax.set_xlabel("candidates evaluated")
        ax.set_ylabel("best proxy accuracy so far (%)")
        ax.set_title(f"{study['model']} / {study['dataset']}: {100 * study['sparsity']:.0f} % "
                     f"{_target_name(study['target'])} removed\n{len(study['seeds'])} seeds, "
                     f"{study['rounds']}×{study['candidates_per_round']} candidates, "
                     f"{study['val_examples']} val images", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO

    config = load_config(args)
    study = run_study(args, config)
    print(f"\n{study['model']} on {study['dataset']}, {100 * study['sparsity']:.0f} % "
          f"{_target_name(study['target'])} removed, {study['rounds']} rounds × "
          f"{study['candidates_per_round']} candidates, seeds {study['seeds']}, "
          f"{study['val_examples']} val images; std over seeds (ddof=1).")
    print(table_text(study))
    print(f"dense proxy {100 * study['dense_proxy_accuracy']:.2f} %, uniform keep at budget "
          f"{100 * study['uniform_at_budget']['proxy_accuracy']:.2f} %; study wall time "
          f"{study['wall_seconds']:.0f} s (dense phase {study['dense_seconds']:.0f} s).")
    if args.out:
        name = args.name or os.path.splitext(os.path.basename(args.config))[0] + (
            f"_{args.variant}" if args.variant else "")
        everything = store(args.out, name, study)
        print(f"stored as {name!r} in {args.out}")
        if args.plot:
            plot(args.plot, everything)
            print(f"plot: {args.plot}")
    elif args.plot:
        plot(args.plot, {"study": study})


if __name__ == "__main__":
    sys.exit(main())
