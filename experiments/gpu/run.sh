#!/usr/bin/env bash
# One prepared GPU run: installs only the carried wheels, runs a config, packs the workdir.
#
#   bash experiments/gpu/run.sh OUT_DIR CONFIG [--config.key=value ...]
#   e.g. (device tool, carry [".whl", ".cache/cifar10_portable.npz"]):
#   bash experiments/gpu/run.sh $OUT configs/cifar10.py:gpu
#   bash experiments/gpu/run.sh OUT_DIR benchmarks/SCRIPT.py [its flags]
#   runs a benchmark instead of the pipeline (with --workdir, and the portable data as
#   --set data.portable_path=...); its flags name its outputs under OUT_DIR.
#
# Environment: PORTABLE (default .cache/cifar10_portable.npz, made by
# `python -m jaxprune.data portable`), WORKDIR (default /tmp/jaxprune_run; point it at an
# unpacked earlier workdir to resume a partial run), TIME_LIMIT (seconds; the run is stopped
# with SIGINT before it, so the pack step still returns the finished phases).
# OUT_DIR receives at most 8 files, each under 16 MiB: log.txt, results.json, results.md,
# dense_params.npz, workdir.tar.gz (plots, metrics, search logs, run_info) and, when small
# enough, checkpoints.tar.gz (to resume on the next attempt).
set -uo pipefail
OUT=${1:?usage: run.sh OUT_DIR CONFIG [flags]}
CONFIG=${2:?usage: run.sh OUT_DIR CONFIG [flags]}
shift 2
cd "$(dirname "$0")/../.."
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/jaxprune_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/jaxprune_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
WORKDIR=${WORKDIR:-/tmp/jaxprune_run}
FLAGS=()
CMD=("$PY" -m jaxprune.main --config="$CONFIG" --workdir="$WORKDIR"
     --config.train.compile_cache_dir=/tmp/jaxprune_jax_cache)
[[ "$CONFIG" == benchmarks/*.py ]] && CMD=("$PY" "$CONFIG" --workdir "$WORKDIR")
if [ -n "${PORTABLE:-}" ] || [ -f .cache/cifar10_portable.npz ]; then
  if [[ "$CONFIG" == benchmarks/*.py ]]; then
    FLAGS+=(--set "data.portable_path=${PORTABLE:-.cache/cifar10_portable.npz}")
  else
    FLAGS+=("--config.data.portable_path=${PORTABLE:-.cache/cifar10_portable.npz}")
  fi
fi
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT/log.txt"
START=$(date +%s)
if [ -n "${TIME_LIMIT:-}" ]; then
  timeout --signal=INT --kill-after=30 "$TIME_LIMIT" \
    "${CMD[@]}" "${FLAGS[@]}" "$@" 2>&1 | tee -a "$OUT/log.txt"
else
  "${CMD[@]}" "${FLAGS[@]}" "$@" 2>&1 | tee -a "$OUT/log.txt"
fi
STATUS=${PIPESTATUS[0]}
echo "[timing] run: $(( $(date +%s) - START )) s, exit status $STATUS" | tee -a "$OUT/log.txt"
$PY experiments/gpu/pack.py "$WORKDIR" "$OUT" 2>&1 | tee -a "$OUT/log.txt"
exit "$STATUS"
