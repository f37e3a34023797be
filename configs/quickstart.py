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
import ml_collections
from ml_collections import config_dict

from jaxprune.search import controllers as controllers_lib


def get_config(arg=None):
    """arg: None (the quick start) or 'smoke' (tests, seconds; same methods, tiny sizes)."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/quickstart.py: unknown variant {arg!r}; use '' or 'smoke'.")
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
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

    config.model = ml_collections.ConfigDict()
    config.model.name = "lenet5"

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 30
    config.train.batch_size = 64
    config.train.eval_batch_size = 256
    config.train.optimizer = "sgd"
    config.train.learning_rate = 0.05
    config.train.momentum = 0.9
    config.train.weight_decay = 5e-4
    config.train.schedule = "cosine"
    config.train.l1 = 0.0
    config.train.l1_target = "weights"
    config.train.checkpoint_every = 200
    config.train.precision = "fp32"  # "bf16": compute in bfloat16 (GPU/TPU); params, optimizer, BN stats stay float32
    config.train.warmup_epochs = 0.0  # linear warm-up of the dense phase (for large batches)
    config.train.label_smoothing = 0.0
    config.train.compile_cache_dir = config_dict.placeholder(str)  # JAX persistent compilation cache

    config.prune = ml_collections.ConfigDict()
    config.prune.methods = "threshold,sensitivity"
    config.prune.granularity = "channel"
    config.prune.scope = "layerwise"
    config.prune.target = "macs"
    config.prune.sparsity = 0.8  # remove 80 % of the MACs: hard enough that the methods differ
    config.prune.criterion = "l1"  # or l2, taylor, snip (gradients on sensitivity_batches), random, bn_scale (channels)
    config.prune.schedule = "oneshot"
    config.prune.channel_multiple = 1  # LeNet-5 has 6 and 16 conv channels: no rounding
    config.prune.sensitivity_batches = 2  # training batches the gradient-sensitivity criteria (taylor, snip) average over
    config.prune.imp_rounds = 3  # prune.schedule="imp": prune-rewind-train rounds
    config.prune.n, config.prune.m = 2, 4  # prune.granularity="nm": keep n of every m weights

    config.finetune = ml_collections.ConfigDict()
    config.finetune.epochs = 20
    config.finetune.learning_rate = 0.01
    config.finetune.warmup_epochs = 0.0

    config.search = ml_collections.ConfigDict()
    config.search.methods = "reinforce,gan,evolution,random,uniform"
    config.search.rounds = 20
    config.search.candidates = 32
    config.search.calib_batches = 2
    config.search.calib_batch_size = 64
    config.search.val_examples = 300
    config.search.lower = 0.05
    config.search.step = 0.0
    config.search.chunk_size = 0  # candidates per vmapped chunk (0: all K at once; 4 is faster on a CPU)
    # Keeps every controller asks first: comma-separated 'uniform', 'threshold', 'sensitivity'
    # (the sensitivity pre-pass's evaluations are taken off the search's rounds); '' = none.
    config.search.seed_keeps = ""
    # Winner by successive halving over the search log (0: the best proxy score wins): the best
    # select_top candidates re-scored on select_val_examples validation images (0: all), the
    # best select_finetune of those fine-tuned select_epochs epochs, judged on the same images.
    config.search.select_top = 0
    config.search.select_val_examples = 0
    config.search.select_finetune = 0
    config.search.select_epochs = 1
    # Controller hyper-parameters, defaults read off each factory (jaxprune/search/); override
    # e.g. --config.search.reinforce.learning_rate=0.1.
    for name in ("reinforce", "gan", "evolution"):
        config.search[name] = ml_collections.ConfigDict(controllers_lib.default_hparams(name))

    if arg == "smoke":
        config.data.val_size = 32
        config.data.train_size = 64
        config.data.test_size = 32
        config.train.epochs = 1
        config.train.batch_size = 16
        config.train.eval_batch_size = 16
        config.train.checkpoint_every = 2
        config.prune.sensitivity_batches = 1
        config.finetune.epochs = 1
        config.search.rounds = 1
        config.search.candidates = 8
        config.search.calib_batches = 1
        config.search.calib_batch_size = 8
        config.search.val_examples = 16
    return config
