"""The device-side training loop vs a bare jitted step in a Python loop, and compilations of a
whole pipeline run before and after the loop changed. Ratios are measured in one run.

    python benchmarks/train_loop.py --models=lenet5,resnet20 --steps=40
    python benchmarks/train_loop.py --compiles --before=87fb73e --config=configs/quickstart.py

Throughput: both loops run the same `train.make_train_step` on the same synthetic CIFAR-shaped
uint8 data held on the device. The bare loop is what `train.fit` did before: per step a host
index array is copied to the device, the step key is made eagerly with `fold_in`, and the
jitted step gathers, normalises and augments the batch. The new loop is `train.TrainFn` (on a
CPU it dispatches steps with no host data and no sync; on an accelerator it scans the chunk in
one call). Compile time is excluded from both (one warm-up chunk each).

Compilations: runs the pipeline on `--config` in a subprocess, once on this tree and once on
`--before` (a git worktree of that commit), counting XLA backend compilations and their seconds
through `jax.monitoring`.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def throughput(model_name: str, steps: int, batch: int, mode):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxprune import masks as masks_lib
    from jaxprune import models, train

    shape = (32, 32, 3)
    model = models.get_model(model_name, num_classes=10, input_shape=shape, key=jax.random.key(0))
    tx = train.make_optimizer(train.Settings(optimizer="sgd", momentum=0.9, weight_decay=5e-4))
    num = 2 * steps * batch  # two "epochs" worth of chunks: warm-up, then timed
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (num,) + shape, dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, (num,), dtype=np.int32))
    mean, std = np.full(3, 120.0, np.float32), np.full(3, 64.0, np.float32)
    step = train.make_train_step(model.apply, tx, schedule="cosine", mean=mean, std=std,
                                 augment=True)
    recipe = train.make_recipe(0.05, 10 * steps)
    ones = masks_lib.ones_like(model.params)
    key = jax.random.key(1)

    # Bare: a jitted step called per batch from Python (the loop before this change).
    bare = jax.jit(lambda s, x, y, i, k, r: step(s, x[i], y[i], k, r), donate_argnums=(0,))
    order = np.asarray(jax.random.permutation(key, num)).reshape(-1, batch)

    def run_bare(state, first):
        for i in range(first, first + steps):
            state, m = bare(state, images, labels, jnp.asarray(order[i]), jax.random.fold_in(key, i),
                            recipe)
        jax.block_until_ready(m)
        return state

    state = run_bare(train.create_state(model.params, model.batch_stats, ones, tx), 0)
    t0 = time.perf_counter()
    run_bare(state, steps)
    t_bare = time.perf_counter() - t0

    fn = train.make_train_fn(step, batch_size=batch, mode=mode)
    state = train.create_state(model.params, model.batch_stats, ones, tx)
    state, m = fn(state, images, labels, key, key, recipe, 0, num_steps=steps)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    state, m = fn(state, images, labels, key, key, recipe, steps, num_steps=steps)
    jax.block_until_ready(m)
    t_new = time.perf_counter() - t0
    return {"model": model_name, "mode": fn.mode, "steps": steps, "batch": batch,
            "bare_img_s": steps * batch / t_bare, "new_img_s": steps * batch / t_new,
            "ratio": t_bare / t_new}


_CHILD = r"""
import json, sys, time, tempfile
from jax import monitoring
events = {"count": 0, "seconds": 0.0}
def listen(name, secs, **kw):
    if name == "/jax/core/compile/backend_compile_duration":
        events["count"] += 1
        events["seconds"] += secs
monitoring.register_event_duration_secs_listener(listen)
from jaxprune import pipeline
path, arg = sys.argv[1], (sys.argv[2] or None)
config = pipeline.load_config(path, arg) if arg else pipeline.load_config(path)
t0 = time.perf_counter()
pipeline.run(config, tempfile.mkdtemp(), progress=False)
events["wall_seconds"] = time.perf_counter() - t0
print("RESULT " + json.dumps(events))
"""


def compiles(tree: str, config: str):
    path, _, arg = config.partition(":")
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, "-c", _CHILD, os.path.join(tree, path), arg],
                         cwd=tree, env=env, capture_output=True, text=True)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"pipeline run in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="lenet5,resnet20")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per loop")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--mode", default=None, choices=[None, "scan", "steps"],
                    help="TrainFn mode (default: steps on a CPU, scan on an accelerator)")
    ap.add_argument("--compiles", action="store_true", help="count a pipeline run's compilations")
    ap.add_argument("--before", default="87fb73e", help="git revision to compare against")
    ap.add_argument("--config", default="configs/quickstart.py")
    args = ap.parse_args()
    if args.compiles:
        with tempfile.TemporaryDirectory() as tmp:
            before_tree = os.path.join(tmp, "before")
            subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", before_tree,
                            args.before], check=True, capture_output=True)
            try:
                before = compiles(before_tree, args.config)
            finally:
                subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", before_tree],
                               capture_output=True)
        after = compiles(REPO, args.config)
        print(f"pipeline {args.config}: compilations before ({args.before}) {before['count']} in "
              f"{before['seconds']:.1f} s (run {before['wall_seconds']:.1f} s); after "
              f"{after['count']} in {after['seconds']:.1f} s (run {after['wall_seconds']:.1f} s); "
              f"compile seconds ratio before/after {before['seconds'] / max(after['seconds'], 1e-9):.2f}")
        return
    import jax
    print(f"device: {jax.devices()[0].platform} x{jax.device_count()}")
    for name in args.models.split(","):
        r = throughput(name, args.steps, args.batch, args.mode)
        print(f"{r['model']:9s} batch {r['batch']} ({r['mode']}): bare jitted step "
              f"{r['bare_img_s']:8.1f} img/s, train.TrainFn {r['new_img_s']:8.1f} img/s, "
              f"ratio {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
