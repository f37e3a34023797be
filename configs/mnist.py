"""MNIST, LeNet-5: train, prune to 50 % of the MACs by hand-set rules and by five searches.

Command:
    TFDS_DATA_DIR=/path/to/tensorflow_datasets \\
    python -m jaxprune.main --config=configs/mnist.py --workdir=runs/mnist
Variants: `configs/mnist.py:smoke` (tests, seconds). `--config.data.name=fashion_mnist` runs
the same recipe on Fashion-MNIST.

Hardware: sized for a 2-core CPU machine (runs as is on an accelerator).
Wall time: to be measured.
Expected result: unpruned LeNet-5 about 99 % test accuracy (to be measured); pruned models at
50 % MACs: to be measured.

Data: TFDS `mnist` from --config.data.data_dir or $TFDS_DATA_DIR, prepared beforehand (jaxprune
never downloads). 5,000 training images are held out for validation; the test split is only
used for the final numbers. No augmentation (flips and crops change digits).
"""
from ml_collections import config_dict

from jaxprune import config_checks


def get_config(arg=None):
    """arg: None (full run) or 'smoke' (tests, seconds)."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/mnist.py: unknown variant {arg!r}; use '' or 'smoke'.")
    config = config_checks.common_config()  # seed, sections, the pruning and search defaults

    config.data.name = "mnist"
    config.data.data_dir = config_dict.placeholder(str)  # None → $TFDS_DATA_DIR
    config.data.val_size = 5000
    config.data.train_size = config_dict.placeholder(int)  # None → all 55,000
    config.data.test_size = config_dict.placeholder(int)  # None → all 10,000
    config.data.augment = False
    config.data.cache = config_dict.placeholder(str)  # optional .npz cache path
    config.data.source = "tfds"  # "portable": read data.portable_path, no TensorFlow needed
    config.data.portable_path = config_dict.placeholder(str)  # `python -m jaxprune.data portable`
    config.data.download = False  # True: let TFDS download it (Colab); offline, keep False

    config.model.name = "lenet5"

    config.train.epochs = 10
    config.train.batch_size = 128
    config.train.eval_batch_size = 1024
    config.train.optimizer = "sgd"
    config.train.learning_rate = 0.05
    config.train.weight_decay = 5e-4
    config.train.l1_target = "weights"
    config.train.checkpoint_every = 1000
    config.train.warmup_epochs = 0.0  # linear warm-up of the dense phase (for large batches)

    config.prune.methods = "threshold,sensitivity"
    config.prune.sparsity = 0.5
    config.prune.channel_multiple = 1  # LeNet-5 has 6 and 16 conv channels: no rounding
    config.prune.sensitivity_batches = 4  # training batches the gradient-sensitivity criteria (taylor, snip) average over

    config.finetune.epochs = 3
    config.finetune.learning_rate = 0.01

    config.search.methods = "reinforce,gan,evolution,random,uniform"
    config.search.rounds = 20
    config.search.candidates = 32
    config.search.calib_batches = 4
    config.search.calib_batch_size = 128
    config.search.val_examples = 2000
    config.search.lower = 0.2

    if arg == "smoke":
        config_checks.smoke_sizes(config)
        config.prune.methods = "threshold"
        config.prune.sensitivity_batches = 1
        config.search.methods = "random"
    return config
