"""Candidates scored per second: one batched call vs a Python loop over candidates.

Both sides use `search.evaluate.make_evaluator` in channel mode (activation masks, shared
weights, adaptive BN on the calibration batches, validation accuracy):

* batched: ONE jitted call for all K candidates (vmapped, sharded over the candidate mesh);
* looped:  the same evaluator compiled for one candidate on one device, called K times.

Compilation is excluded (one warm-up call each); the median of ``--repeats`` timed runs is
reported. Images are random (speed only; the accuracies are meaningless).

    python benchmarks/batched_eval.py                         # lenet5, 8x8x1 (digits-sized)
    python benchmarks/batched_eval.py --model resnet20 --input_shape 32,32,3 --val_examples 128
    python benchmarks/batched_eval.py --host_devices 2        # split K over 2 host devices

The channel masks are inserted into the model's traced program (`discover.hookless_apply`,
the groups discovered and named after the model's widths, as `jaxprune.Pruner` does).
"""
import argparse
import os
import statistics
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--input_shape", default="8,8,1")
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--candidates", default="16,64", help="comma-separated K values")
    parser.add_argument("--val_examples", type=int, default=256)
    parser.add_argument("--eval_batch_size", type=int, default=128)
    parser.add_argument("--calib_batches", type=int, default=2)
    parser.add_argument("--calib_batch_size", type=int, default=32)
    parser.add_argument("--chunk_size", type=int, default=0, help="0: no chunking")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--host_devices", type=int, default=0,
                        help="force this many host CPU devices (0: leave JAX's default)")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.host_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.host_devices}")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxprune import masks, models, parallel, pruner
    from jaxprune.search import evaluate as evaluate_lib

    input_shape = tuple(int(d) for d in args.input_shape.split(","))
    keys = jax.random.split(jax.random.key(0), 5)
    model = models.get_model(args.model, num_classes=args.num_classes, input_shape=input_shape,
                             key=keys[0])
    n_calib = args.calib_batches * args.calib_batch_size
    calib = jax.random.normal(keys[1], (n_calib,) + input_shape)
    val_x = jax.random.normal(keys[2], (args.val_examples,) + input_shape)
    val_y = jax.random.randint(keys[3], (args.val_examples,), 0, args.num_classes)
    problem = pruner.Pruner(model.apply, model.params, model.batch_stats, input_shape,
                            discovery=models.discovery(model), sparsity=0.0)
    apply, groups = problem.apply, problem.groups  # activation masks without a hook
    scores = masks.channel_scores(jax.tree.map(jnp.abs, model.params), groups)
    kwargs = dict(eval_batch_size=args.eval_batch_size, calib_batch_size=args.calib_batch_size,
                  chunk_size=args.chunk_size or None)

    batched = evaluate_lib.make_evaluator(apply, groups, **kwargs)
    single = evaluate_lib.make_evaluator(apply, groups,
                                         mesh=parallel.candidate_mesh(jax.devices()[:1]), **kwargs)
    # Shared inputs placed once, as a search loop would (placement is a no-op afterwards).
    shared_b = parallel.replicate((model.params, model.batch_stats, scores, calib, val_x, val_y),
                                  batched.mesh)
    shared_s = parallel.replicate((model.params, model.batch_stats, scores, calib, val_x, val_y),
                                  single.mesh)

    def run_batched(keep):
        p, s, sc, c, x, y = shared_b
        return batched(p, s, sc, keep, c, x, y)["accuracy"]

    def run_looped(keep):
        p, s, sc, c, x, y = shared_s
        return np.concatenate([single(p, s, sc, keep[i:i + 1], c, x, y)["accuracy"]
                               for i in range(keep.shape[0])])

    def seconds(fn, keep):
        fn(keep)  # compile + warm up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn(keep)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    print(f"model={args.model} input={input_shape} groups={len(groups)} "
          f"bn_leaves={len(jax.tree.leaves(model.batch_stats))} val={args.val_examples} "
          f"calib={args.calib_batches}x{args.calib_batch_size} "
          f"devices(batched)={batched.mesh.devices.size} backend={jax.default_backend()} "
          f"cpu_count={os.cpu_count()}")
    print(f"{'K':>4} {'batched s':>10} {'looped s':>10} {'batched cand/s':>15} "
          f"{'looped cand/s':>14} {'speed-up':>9}")
    for k in (int(v) for v in args.candidates.split(",")):
        keep = np.asarray(jax.random.uniform(jax.random.fold_in(keys[4], k),
                                             (k, len(groups)), minval=0.2, maxval=1.0))
        np.testing.assert_allclose(run_batched(keep), run_looped(keep), atol=1e-6)
        tb, tl = seconds(run_batched, keep), seconds(run_looped, keep)
        print(f"{k:>4} {tb:>10.3f} {tl:>10.3f} {k / tb:>15.1f} {k / tl:>14.1f} {tl / tb:>8.2f}x")


if __name__ == "__main__":
    main()
