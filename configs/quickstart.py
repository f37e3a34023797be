"""Quick start: 8x8 digits (embedded, no download, no TensorFlow), LeNet-5, every method.

Command:
    python -m jaxprune.main --config=configs/quickstart.py --workdir=runs/quickstart
Without the five searches: add `--config.search.methods=`. Tests: `configs/quickstart.py:smoke`.

Hardware: sized for a 2-core CPU machine.
Wall time: 1 min 36 s with all five searches on an idle 2-core CPU
(experiments/2026-11-30_quickstart, commit 25baede).
Expected result: unpruned LeNet-5 97.5 % test accuracy on the 360 held-out digits; at 20 % of
the dense MACs every method 93.6-96.7 % (seed 0; one test image is 0.28 points, and the fine-tune
noise between two runs of one architecture was 0.8 points).

Data: scikit-learn's `load_digits` (1,797 images, 8x8 grey levels scaled to 0..255); a fixed
360 are its test split, 300 of the rest are held out for validation (search and model
selection), 1,137 train.
"""
from ml_collections import config_dict

from jaxprune import config_checks


def get_config(arg=None):
    """arg: None (the quick start) or 'smoke' (tests, seconds; same methods, tiny sizes)."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/quickstart.py: unknown variant {arg!r}; use '' or 'smoke'.")
    config = config_checks.common_config()  # seed, sections, the pruning and search defaults

    config.data.name = "digits"
    config.data.data_dir = config_dict.placeholder(str)  # unused by the embedded source
    config.data.val_size = 300
    config.data.train_size = config_dict.placeholder(int)  # None → all 1,137
    config.data.test_size = config_dict.placeholder(int)  # None → all 360
    config.data.augment = False  # flips and crops change digits
    config.data.cache = config_dict.placeholder(str)
    config.data.source = "tfds"  # unused: digits are embedded (no TFDS, no portable file)
    config.data.portable_path = config_dict.placeholder(str)  # unused by the embedded source
    config.data.download = False  # unused by the embedded source

    config.model.name = "lenet5"

    config.train.epochs = 30
    config.train.batch_size = 64
    config.train.eval_batch_size = 256
    config.train.optimizer = "sgd"
    config.train.learning_rate = 0.05
    config.train.weight_decay = 5e-4
    config.train.l1_target = "weights"
    config.train.checkpoint_every = 200
    config.train.warmup_epochs = 0.0  # linear warm-up of the dense phase (for large batches)

    config.prune.methods = "threshold,sensitivity"
    config.prune.sparsity = 0.8  # remove 80 % of the MACs: hard enough that the methods differ
    config.prune.channel_multiple = 1  # LeNet-5 has 6 and 16 conv channels: no rounding
    config.prune.sensitivity_batches = 2  # training batches the gradient-sensitivity criteria (taylor, snip) average over

    config.finetune.epochs = 20
    config.finetune.learning_rate = 0.01

    config.search.methods = "reinforce,gan,evolution,random,uniform"
    config.search.rounds = 20
    config.search.candidates = 32
    config.search.calib_batches = 2
    config.search.calib_batch_size = 64
    config.search.val_examples = 300
    config.search.lower = 0.05

    if arg == "smoke":
        config_checks.smoke_sizes(config)
        config.prune.sensitivity_batches = 1
    return config
