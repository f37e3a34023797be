#!/bin/bash
# Before (declared groups + channel_masks hook + structure.compact, commit 9723022) vs after
# (discovered groups, hookless masks, surgery.slice_variables + models.with_widths): the same
# benchmark commands, interleaved B A A B so load drift on the shared machine cancels.
# Sizes are small: the 2-core machine was shared by ~8 other jobs (load 15-18) when it ran.
# Usage: run.sh BEFORE_CHECKOUT AFTER_CHECKOUT > log
set -u
BEFORE=$1; AFTER=$2
. /work/venv/bin/activate
run() {  # run LABEL CHECKOUT ARGS...
  local label=$1 dir=$2; shift 2
  echo "=== $label $(date +%T) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  (cd "$dir" && PYTHONPATH="$dir" python "$@" 2>&1 | grep -v Warning)
}
compaction() {  # the compaction call alone, ResNet-20 at 50 % keep, median of 5 (after warm-up)
  local label=$1 dir=$2
  echo "=== $label compaction $(date +%T) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  (cd "$dir" && PYTHONPATH="$dir" python - <<'PY'
import statistics, time, jax, numpy as np
from jaxprune import models
m = models.get_model("resnet20", num_classes=10, input_shape=(32, 32, 3), key=jax.random.key(0))
new = hasattr(models, "with_widths")
if new:
    from jaxprune import surgery
    groups = models.channel_groups(m)
else:
    groups = m.groups
rng = np.random.default_rng(0)
keep = {g.name: rng.permutation(g.size) < g.size // 2 for g in groups}
def once():
    if new:
        v = surgery.slice_variables({"params": m.params, "batch_stats": m.batch_stats},
                                    models.discovery(m), keep)
        s = models.with_widths(m, {n: int(k.sum()) for n, k in keep.items()}, v["params"],
                               v["batch_stats"])
    else:
        s = models.compact_model(m, keep)
    jax.block_until_ready(s.params)
once()
times = []
for _ in range(5):
    t = time.perf_counter(); once(); times.append(time.perf_counter() - t)
print(f"compaction median {statistics.median(times) * 1e3:.1f} ms")
PY
  )
}
uptime
MS="benchmarks/masked_step.py --model=resnet20 --batch=32 --repeats=5"
BL="benchmarks/batched_eval.py --candidates 16,64"
BR="benchmarks/batched_eval.py --model resnet20 --input_shape 32,32,3 --candidates 8 --val_examples 32 --calib_batches 1 --calib_batch_size 16 --eval_batch_size 32 --chunk_size 4 --repeats 2"
CL="benchmarks/compact_latency.py --model resnet20 --batch_size 32 --repeats 10"
for order in "before after" "after before"; do
  for side in $order; do
    dir=$BEFORE; [ "$side" = after ] && dir=$AFTER
    run "$side masked_step" "$dir" $MS
    run "$side batched_eval lenet5" "$dir" $BL
    run "$side batched_eval resnet20" "$dir" $BR
    run "$side compact_latency" "$dir" $CL
    compaction "$side" "$dir"
  done
done
uptime
