"""Proxy fidelity: does the search's cheap score rank candidates as their fine-tuned accuracy does?

A search can only be as good as the score it maximises. This benchmark takes one trained dense
model, samples candidate keep vectors under the budget spread over the proxy's whole range,
scores every candidate with several proxies (validation subsets of different sizes, accuracy or
loss, with or without BatchNorm recalibration), then fine-tunes every candidate the same way and
measures its test accuracy. It reports the rank correlation of each proxy with the fine-tuned
accuracy (Spearman's rho and Kendall's tau) with 95 % bootstrap intervals over candidates, and
the cost of each proxy (seconds to score all candidates, warm).

    TFDS_DATA_DIR=../shared/tensorflow_datasets python benchmarks/proxy_fidelity.py \\
        --config configs/cifar10.py:lenet \\
        --dense experiments/2026-11-28_cifar10_lenet_cpu/dense_params.npz \\
        --candidates 24 --out experiments/2026-11-30_proxy_fidelity/results.json

`--dense` is an .npz of `params/...` (and `batch_stats/...`) leaves as `experiments/gpu/pack.py`
writes them; without it the dense model is trained by the pipeline in `--workdir`. The
candidates and fine-tunes are seeded (`--seed`), so a rerun gives the same numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/cifar10.py:lenet",
                   help="config file[:variant]: data, model, budget and fine-tune recipe")
    p.add_argument("--dense", default=None, help=".npz of the trained dense variables")
    p.add_argument("--workdir", default="runs/proxy_fidelity",
                   help="pipeline workdir that trains the dense model when --dense is not given")
    p.add_argument("--candidates", type=int, default=24, help="candidates fine-tuned")
    p.add_argument("--pool", type=int, default=256,
                   help="random candidates the fine-tuned ones are picked from, spread evenly "
                        "over their cheapest-proxy ranks")
    p.add_argument("--epochs", type=int, default=None,
                   help="fine-tune epochs per candidate (default: the config's finetune.epochs)")
    p.add_argument("--proxies", default="val500,val2000,val5000,loss5000,val500_calib8",
                   help="comma list of valN (accuracy on the first N validation images), "
                        "lossN (minus the loss on them), suffix _calibB (BatchNorm recalibrated on "
                        "B batches of search.calib_batch_size; default search.calib_batches)")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results JSON (a plot is written beside it)")
    return p.parse_args(argv)


def parse_proxy(name: str, default_calib: int) -> dict:
    """'val500' → accuracy on 500 images; 'loss5000_calib8' → -loss on 5000, 8 calib batches."""
    head, _, calib = name.partition("_calib")
    for metric, prefix in (("accuracy", "val"), ("loss", "loss")):
        if head.startswith(prefix) and head[len(prefix):].isdigit():
            return {"name": name, "metric": metric, "val": int(head[len(prefix):]),
                    "calib": int(calib) if calib else default_calib}
    raise SystemExit(f"--proxies: cannot read {name!r}; use valN, lossN, optionally _calibB.")


def rank_correlations(proxy, truth, n_boot: int, seed: int) -> dict:
    """Spearman's rho and Kendall's tau of `proxy` vs `truth`, with 95 % percentile bootstrap
    intervals over candidates (resampled with replacement)."""
    import numpy as np
    from scipy import stats

    proxy, truth = np.asarray(proxy, np.float64), np.asarray(truth, np.float64)
    out = {"spearman": float(stats.spearmanr(proxy, truth).statistic),
           "kendall": float(stats.kendalltau(proxy, truth).statistic)}
    rng = np.random.default_rng(seed)
    boots = {"spearman": [], "kendall": []}
    for _ in range(n_boot):
        idx = rng.integers(0, len(proxy), len(proxy))
        if np.ptp(proxy[idx]) == 0 or np.ptp(truth[idx]) == 0:
            continue
        boots["spearman"].append(stats.spearmanr(proxy[idx], truth[idx]).statistic)
        boots["kendall"].append(stats.kendalltau(proxy[idx], truth[idx]).statistic)
    for key, values in boots.items():
        lo, hi = np.nanpercentile(values, [2.5, 97.5])
        out[f"{key}_ci"] = [float(lo), float(hi)]
    return out


def load_dense(args, config):
    """(context, params, batch_stats): the pipeline's context and the dense variables."""
    from jaxprune import modelio, pipeline

    ctx = pipeline.make_context(config, args.workdir, progress=True)
    if args.dense is None:
        state, _ = pipeline.dense_phase(ctx)
        return ctx, state.params, state.batch_stats
    params, batch_stats = modelio.load_dense_params(args.dense, ctx.model)
    return ctx, params, batch_stats


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np

    from jaxprune import pipeline
    from jaxprune.pruner import score_in_chunks
    from jaxprune.search import space as space_lib

    path, _, variant = args.config.partition(":")
    config = pipeline.load_config(path, variant or None)
    with config.unlocked():
        config.prune.methods, config.search.methods = "", ""
    ctx, params, batch_stats = load_dense(args, config)
    ds, s = ctx.dataset, config.search
    state = types.SimpleNamespace(params=params, batch_stats=batch_stats)
    pruner = pipeline.make_pruner(ctx, state)
    proxies = [parse_proxy(p.strip(), int(s.calib_batches))
               for p in args.proxies.split(",") if p.strip()]
    for proxy in proxies:
        if proxy["val"] > ds.val_images.shape[0]:
            raise SystemExit(f"--proxies {proxy['name']}: the validation split has only "
                             f"{ds.val_images.shape[0]} images.")

    def evaluator(proxy):
        return pipeline.candidate_evaluator(ctx, pruner, val=(0, proxy["val"]),
                                            calib_batches=proxy["calib"], metric=proxy["metric"])

    # The pool, projected under the budget; the fine-tuned candidates spread over its ranks
    # under the first proxy.
    pool = space_lib.uniform_sample(jax.random.key(args.seed), pruner.space, args.pool)
    pool = np.unique(pruner.project(pool), axis=0)
    k = int(s.candidates)
    scores = score_in_chunks(evaluator(proxies[0]), pool, k)
    order = np.argsort(scores, kind="stable")
    pick = order[np.unique(np.linspace(0, len(order) - 1, args.candidates).round().astype(int))]
    cands = pool[pick]
    print(f"{len(pool)} distinct candidates in the pool; {len(cands)} picked over its proxy range "
          f"({100 * scores[pick].min():.1f}-{100 * scores[pick].max():.1f} %).", flush=True)

    def score_all(evaluate):
        return score_in_chunks(evaluate, cands, k)

    proxy_scores, proxy_seconds = {}, {}
    for proxy in proxies:
        evaluate = evaluator(proxy)
        score_all(evaluate)  # compile
        t0 = time.perf_counter()
        values = score_all(evaluate)
        proxy_seconds[proxy["name"]] = time.perf_counter() - t0
        proxy_scores[proxy["name"]] = values
        print(f"proxy {proxy['name']}: {proxy_seconds[proxy['name']]:.2f} s for "
              f"{len(cands)} candidates", flush=True)

    # Ground truth: the same fine-tune for every candidate, test accuracy.
    epochs = int(args.epochs or config.finetune.epochs)
    from jaxprune import train as train_lib

    settings = train_lib.Settings.from_config(config)  # the pipeline's fine-tune, exactly
    truth, macs = [], []
    t_ft = time.perf_counter()
    for i, keep in enumerate(cands):
        tuned = pruner.finetune(keep, ds.train_images, ds.train_labels, epochs=epochs,
                                key=jax.random.fold_in(jax.random.key(args.seed), i),
                                learning_rate=float(config.finetune.learning_rate),
                                warmup_epochs=float(config.finetune.warmup_epochs),
                                settings=settings, mean=ds.mean, std=ds.std)
        truth.append(float(ctx.evaluate(tuned.params, tuned.batch_stats, ctx.test)["accuracy"]))
        macs.append(float(pruner.cost.macs(keep)) / pruner.cost.dense_macs)
        print(f"[{i + 1}/{len(cands)}] keep {np.round(keep, 3).tolist()} MACs {100 * macs[-1]:.1f} % "
              f"proxy {100 * proxy_scores[proxies[0]['name']][i]:.2f} % → fine-tuned test "
              f"{100 * truth[-1]:.2f} % ({time.perf_counter() - t_ft:.0f} s)", flush=True)

    rows = []
    for proxy in proxies:
        values = proxy_scores[proxy["name"]]
        signed = -values if proxy["metric"] == "loss" else values  # higher = better
        corr = rank_correlations(signed, truth, args.bootstrap, args.seed)
        rows.append(dict(proxy=proxy["name"], seconds=proxy_seconds[proxy["name"]], **corr))
    print(f"\n{'proxy':<18} {'spearman':>22} {'kendall':>22} {'seconds':>8}")
    for r in rows:
        print(f"{r['proxy']:<18} {r['spearman']:>6.3f} [{r['spearman_ci'][0]:.2f}, "
              f"{r['spearman_ci'][1]:.2f}]  {r['kendall']:>6.3f} [{r['kendall_ci'][0]:.2f}, "
              f"{r['kendall_ci'][1]:.2f}]  {r['seconds']:>8.2f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "dense": args.dense, "epochs": epochs,
                       "budget_fraction": pruner.budget / pruner.dense_cost,
                       "candidates": cands.tolist(), "macs_fraction": macs,
                       "finetuned_test_accuracy": truth,
                       "proxy_scores": {k: v.tolist() for k, v in proxy_scores.items()},
                       "correlations": rows}, f, indent=1)
        plot(os.path.splitext(args.out)[0] + ".png", proxy_scores, truth, rows, proxies)
    return 0


def plot(path, proxy_scores, truth, rows, proxies):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(proxies), figsize=(3.2 * len(proxies), 3.2), squeeze=False)
    for ax, proxy, row in zip(axes[0], proxies, rows):
        x = np.asarray(proxy_scores[proxy["name"]]) * (1 if proxy["metric"] == "loss" else 100)
        ax.scatter(x, 100 * np.asarray(truth), s=14)
        ax.set_xlabel(f"{proxy['name']} ({'loss' if proxy['metric'] == 'loss' else 'acc. %'})")
        ax.set_title(f"rho {row['spearman']:.2f}, tau {row['kendall']:.2f}", fontsize=9)
    axes[0][0].set_ylabel("fine-tuned test accuracy %")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
