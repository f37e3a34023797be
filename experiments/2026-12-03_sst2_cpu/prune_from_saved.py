"""Prunes the committed unpruned SST-2 Transformer (models/unpruned, beside this script) with
every method of configs/sst2.py:cpu, without retraining it: the pipeline's dense phase is
replaced by a restore of the saved model (its spec, data split and tokenizer must equal the
run's), then `pipeline.run` does everything else (pruning, searches, fine-tunes, compaction,
report) as usual, checkpointed and resumable: run the same command again to continue.

    TFDS_DATA_DIR=../shared/tensorflow_datasets nice -n 10 python \\
        experiments/2026-12-03_sst2_cpu/prune_from_saved.py --workdir runs/sst2_cpu_pruned \\
        [--config.finetune.epochs=1 ...: any config key]
"""
import os
import sys
import types

from absl import app, flags
from ml_collections import config_flags

from jaxprune import experiment, modelio, pipeline

HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(HERE, "..", "..", "configs", "sst2.py:cpu"),
                                lock_config=True)
flags.DEFINE_string("workdir", None, "run folder (checkpoints, results, saved models)")


def dense_from_saved(exp):
    """`pipeline.dense_phase`'s (state, row), from the saved model instead of training."""
    model, params, batch_stats = modelio.restore_model(HERE, "unpruned")
    if model.spec != exp.model.spec:
        sys.exit(f"the saved model is {model.spec}, this run's {exp.model.spec}")
    saved_row = modelio.read_model_info(HERE, "unpruned")["row"]
    row = experiment.measure_row(exp, "unpruned", model=exp.model, params=params,
                                 batch_stats=batch_stats,
                                 train_seconds=float(saved_row["train_seconds"]))
    print(f"[dense] restored {HERE}/models/unpruned: test accuracy {row['accuracy']:.4f} "
          f"(saved row {saved_row['accuracy']:.4f})", flush=True)
    return types.SimpleNamespace(params=params, batch_stats=batch_stats), row


def main(argv):
    del argv
    pipeline.dense_phase = dense_from_saved
    pipeline.run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
