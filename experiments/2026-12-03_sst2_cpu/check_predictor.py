"""Re-scores every saved model of this folder (`models/<method>/`: the unpruned one and the best
pruned one) on GLUE SST-2 validation from raw text: `jaxprune.load_predictor(folder, method)`
on the 872 sentences must give the test accuracy of the method's row (saved in its model.json).

    TFDS_DATA_DIR=../shared/tensorflow_datasets python experiments/2026-12-03_sst2_cpu/check_predictor.py
"""
import os
import sys

import numpy as np

import jaxprune
from jaxprune import data, modelio

HERE = os.path.dirname(os.path.abspath(__file__))


def main(workdir: str = HERE) -> int:
    _, _, sentences, labels = data._load_tfds_text("sst2", data._resolve_data_dir(None))
    failed = 0
    for method in sorted(os.listdir(os.path.join(workdir, "models"))):
        logits = jaxprune.load_predictor(workdir, method)(list(sentences))
        accuracy = float(np.mean(np.argmax(logits, -1) == labels))
        reported = modelio.read_model_info(workdir, method)["row"]["accuracy"]
        print(f"{method}: predictor on {len(labels)} raw validation sentences: {accuracy:.4%} "
              f"(its row: {reported:.4%})")
        failed += abs(accuracy - reported) >= 1e-6
    return int(failed > 0)


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
