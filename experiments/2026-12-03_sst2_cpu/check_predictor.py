"""Re-scores the saved unpruned model of this folder on GLUE SST-2 validation from raw text:
`jaxprune.load_predictor(workdir)(sentences)` must give the accuracy in results.json.

    TFDS_DATA_DIR=../shared/tensorflow_datasets python experiments/2026-12-03_sst2_cpu/check_predictor.py
"""
import json
import os
import sys

import numpy as np

import jaxprune
from jaxprune import data

HERE = os.path.dirname(os.path.abspath(__file__))


def main(workdir: str = HERE) -> int:
    _, _, sentences, labels = data._load_tfds_text("sst2", data._resolve_data_dir(None))
    logits = jaxprune.load_predictor(workdir, "unpruned")(list(sentences))
    accuracy = float(np.mean(np.argmax(logits, -1) == labels))
    with open(os.path.join(workdir, "results.json")) as f:
        reported = next(r for r in json.load(f) if r["method"] == "unpruned")["accuracy"]
    print(f"predictor on {len(labels)} raw validation sentences: {accuracy:.4%} "
          f"(results.json: {reported:.4%})")
    return 0 if abs(accuracy - reported) < 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
