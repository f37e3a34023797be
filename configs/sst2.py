"""SST-2 (GLUE sentiment, 2 classes): a small Transformer encoder trained from scratch on token
ids, to be pruned by attention heads and FFN neurons at 50 % of its MACs.

Commands:
    TFDS_DATA_DIR=../shared/tensorflow_datasets \\
    python -m jaxprune.main --config=configs/sst2.py:cpu --workdir=runs/sst2_cpu
    TFDS_DATA_DIR=../shared/tensorflow_datasets \\
    python -m jaxprune.main --config=configs/sst2.py:gpu --workdir=runs/sst2_gpu

Data: TFDS `glue/sst2` from --config.data.data_dir or $TFDS_DATA_DIR. GLUE's test labels are
hidden, so its labelled `validation` split (872 sentences) is this project's test split: every
reported accuracy is on it. `data.val_size` phrases of GLUE's train split (67,349) are held out
as the validation split for the search and the selection; the rest trains. A word-level
WordPiece tokenizer (jaxprune/text.py, Hugging Face `tokenizers`) is made from the training
part only (`data.vocab_size` words at most, those seen at least twice) and saved beside every
model. Each sentence becomes `data.seq_len` int32 ids: [CLS], its words, padding; longer
sentences are truncated (at 64, none of SST-2's: the longest validation sentence has 51 words
and punctuation marks, the longest train phrase 57).

Model: `transformer` (jaxprune/models/transformer.py): token + position embeddings, 2 pre-LN
blocks of 4-head self-attention (d_model 64) and a 128-unit ReLU FFN, dropout 0.1, mean over
the non-pad tokens, classifier. Dense MACs at seq_len 64 are reported in the results row.

Pruning: every method (`prune.methods` threshold and sensitivity; `search.methods` reinforce,
gan, evolution, random and uniform) at `prune.sparsity = 0.5`: 50 % of the dense MACs at
`data.seq_len` (64; attention's QK^T and AV grow with it) removed by pruning attention heads and
FFN neurons, one keep ratio per block for each (`block{i}.heads`, `block{i}.ffn`: groups that
discovery finds in the traced program; a head group keeps whole heads). The methods choose the
keep ratios; within a group every method keeps the heads and neurons with the highest
`prune.criterion` scores (l1: the L1 norm of a head's q/k/v kernel slices, of a neuron's input
weights; `--config.prune.criterion=mask_gradient`: the gradient of their masks on training
batches, Michel et al. 2019's head importance). Sensitivity prunes each group alone on the keep
grid, scored on the held-out phrases. Every winner is fine-tuned with the config's optimizer
(AdamW) and cut out of the model (fewer heads, narrower FFNs).

Variants:
  '' / gpu  The cpu recipe with more epochs on one accelerator (not run yet; no prediction
            beyond the cpu result).
  cpu       A 2-core CPU: 3 epochs of batch 64, AdamW (weight decay 0.01) at peak 1e-3 after
            half an epoch of warm-up, cosine; pruning with 1-epoch fine-tunes at 3e-4 and
            8 rounds x 16 candidates per search. Measured for the unpruned model only
            (experiments/2026-12-03_sst2_cpu): 82.45 % on GLUE validation after 24 min of
            training on the shared CPU (the issue's goal, 83 %, not reached; dropout 0.2 with
            label smoothing 0.1 gave 81.77 %). Pruned from that saved model
            (`--config.train.init_from=experiments/2026-12-03_sst2_cpu`), every method at
            49.8 % of the MACs: threshold 82.91 %, uniform 82.57, REINFORCE and GAN 82.45,
            sensitivity and evolution 82.34, random 82.22 (all within one run's standard error).
  smoke     tests, about a minute (64 training phrases, seq_len 16, every method).

Hardware: `cpu` a 2-core CPU (shared); `gpu` one accelerator.
Wall time: `cpu` about 25 min of dense training on the shared 2-core CPU (3 epochs of 1,021
steps), then 7 one-epoch fine-tunes (5-39 min each there, by the load) and 5 searches: the
pruning took 6,579 s in its last start alone on the shared CPU;
`smoke` about a minute (every method; mostly compilation); `gpu` not measured.
Expected result: `cpu` unpruned 82.45 % on GLUE validation, pruned 82.2-82.9 % (measured, see
above; 872 sentences, so one run's standard error is about 1.3 points); `gpu`: no prediction.
"""
from ml_collections import config_dict

from jaxprune import config_checks

VARIANTS = ("", "gpu", "cpu", "smoke")


def get_config(arg=None):
    """arg: None / 'gpu' (an accelerator), 'cpu' (2 CPU cores) or
    'smoke' (tests, seconds)."""
    if arg not in (None,) + VARIANTS:
        raise ValueError(f"configs/sst2.py: unknown variant {arg!r}; use one of "
                         f"{', '.join(repr(v) for v in VARIANTS)}.")
    config = config_checks.common_config()  # seed, sections, the pruning and search defaults

    config.data.name = "sst2"
    config.data.data_dir = config_dict.placeholder(str)  # None → $TFDS_DATA_DIR
    config.data.val_size = 2000  # phrases of GLUE train held out for search and selection
    config.data.train_size = config_dict.placeholder(int)  # None → the other 65,349
    config.data.test_size = config_dict.placeholder(int)  # None → all 872 (GLUE validation)
    config.data.seq_len = 64  # token ids per sentence ([CLS] + words); longer ones truncated
    config.data.vocab_size = 16384  # the tokenizer's largest vocabulary (SST-2 gives ~13.4k)
    config.data.augment = False  # text: no augmentation
    config.data.cache = config_dict.placeholder(str)  # image datasets only (text is refused)
    config.data.download = False

    config.model.name = "transformer"

    config.train.epochs = 3
    config.train.batch_size = 64
    config.train.eval_batch_size = 500
    config.train.optimizer = "adam"  # AdamW: decoupled weight decay
    config.train.learning_rate = 1e-3
    config.train.weight_decay = 0.01
    config.train.warmup_epochs = 0.5
    config.train.l1_target = "weights"
    config.train.checkpoint_every = 500

    config.prune.methods = "threshold,sensitivity"
    config.prune.sparsity = 0.5  # remove 50 % of the MACs (at data.seq_len)
    config.prune.channel_multiple = 1
    config.prune.sensitivity_batches = 4

    config.finetune.epochs = 1
    config.finetune.learning_rate = 3e-4

    config.search.methods = "reinforce,gan,evolution,random,uniform"
    config.search.rounds = 8
    config.search.candidates = 16
    config.search.calib_batches = 1
    config.search.calib_batch_size = 64
    config.search.val_examples = 2000
    config.search.lower = 0.2
    config.search.chunk_size = 4

    if arg in (None, "", "gpu"):
        config.train.epochs = 6
        config.train.batch_size = 128
        config.train.learning_rate = 1.5e-3
        config.train.eval_batch_size = 1000
        config.search.chunk_size = 0
    elif arg == "smoke":
        config_checks.smoke_sizes(config)
        config.data.seq_len = 16
    return config
