"""Budget slack of `search.budget.project` on the CIFAR channel grid (whole multiples of 8).

For each model and MACs budget, N random keep vectors (uniform in the search box, as the
`random` controller draws them) are projected exactly as the pipeline does (per-group step
`channel_multiple / size`, lower bound `search.lower` rounded up to the grid). The slack of a
candidate is `(budget - macs(projected)) / dense_macs`: the part of the budget it leaves
unused. Prints median / max slack (in % of the dense MACs), the number of candidates over the
budget (must be 0), the MACs fraction of `project(ones)` (the uniform keep that layer-wise
threshold pruning uses) and how many distinct architectures N uniform-control proposals
become (must be 1).

    python benchmarks/projection_slack.py
    python benchmarks/projection_slack.py --models resnet20 --budgets 0.5 --n 200
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import models as models_lib
from jaxprune import pruner as pruner_lib
from jaxprune.search import budget as budget_lib
from jaxprune.search import controllers
from jaxprune.search import space as space_lib


def grid_setup(name: str, multiple: int = 8, lower: float = 0.2, target: str = "macs"):
    """(cost model, cost_fn, dense cost, space, step) as `jaxprune.Pruner` builds them for CIFAR."""
    model = models_lib.get_model(name, num_classes=10, input_shape=(32, 32, 3),
                                 key=jax.random.key(0))
    p = pruner_lib.Pruner(model.apply, model.params, model.batch_stats, (32, 32, 3),
                          discovery=models_lib.discovery(model), sparsity=0.0, target=target, lower=lower,
                          channel_multiple=multiple)
    return p.cost, p.budget_fn, p.dense_cost, p.space, p.step


def measure(name: str, fractions, n: int, seed: int = 0, multiple: int = 8):
    cm, cost_fn, dense, space, step = grid_setup(name, multiple)
    rows = []
    for fraction in fractions:
        budget = fraction * dense
        project = jax.jit(lambda keep, budget=budget: budget_lib.project(
            keep, cost_fn, budget, space.lower, space.upper, step=step))
        keeps = space_lib.uniform_sample(jax.random.key(seed), space, n)
        t0 = time.perf_counter()
        out = jax.block_until_ready(project(keeps))
        seconds = time.perf_counter() - t0
        used = np.asarray([cm.macs_exact(k) for k in np.asarray(out)], np.float64)
        slack = (budget - used) / dense
        ones = np.asarray(project(jnp.ones((1, space.num_groups), jnp.float32)))[0]
        uniform = controllers.get_controller("uniform")
        proposals = uniform.ask(jax.random.key(seed + 1), uniform.init(None, space), n)
        archs = np.asarray(cm.kept(project(proposals)))
        rows.append(dict(model=name, budget=fraction, median=100 * float(np.median(slack)),
                         max=100 * float(np.max(slack)), over=int(np.sum(slack < 0)),
                         ones=cm.macs_exact(ones) / dense,
                         uniform_archs=len({tuple(a) for a in archs}), seconds=seconds))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet56,vgg16")
    parser.add_argument("--budgets", default="0.3,0.5,0.7", help="MACs fractions kept")
    parser.add_argument("--n", type=int, default=1000, help="random candidates per budget")
    parser.add_argument("--multiple", type=int, default=8, help="prune.channel_multiple")
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.budgets.split(",")]
    print(f"slack = (budget - MACs) / dense MACs over {args.n} random candidates, "
          f"{args.multiple}-channel grid")
    print(f"{'model':9s} {'budget':>6s} {'median %':>9s} {'max %':>7s} {'over':>5s} "
          f"{'ones->':>7s} {'uniform archs':>13s} {'s (jit+run)':>11s}")
    for name in args.models.split(","):
        for r in measure(name, fractions, args.n, multiple=args.multiple):
            print(f"{r['model']:9s} {r['budget']:6.2f} {r['median']:9.3f} {r['max']:7.3f} "
                  f"{r['over']:5d} {r['ones']:7.3f} {r['uniform_archs']:13d} {r['seconds']:11.2f}")


if __name__ == "__main__":
    main()
