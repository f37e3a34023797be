"""The pruning problem of one trained model, outside the driver (`pipeline.py` adds only phases,
checkpoints and the report).

    import jaxprune as jp
    apply, params, batch_stats = jp.functional(my_nnx_module)      # or a zoo / Linen apply
    pruner = jp.Pruner(apply, params, batch_stats, input_shape=(32, 32, 3), sparsity=0.5)
    evaluate = pruner.evaluator(calib_images, val_images, val_labels)   # keep[K, G] -> acc[K]
    keep = pruner.search("evolution", evaluate, key=jax.random.key(0)).best_keep
    tuned = pruner.finetune(keep, train_images, train_labels, epochs=2, key=k)
    small_apply, small_variables = pruner.compact(keep, tuned.params, tuned.batch_stats)

A `Pruner` holds the dense model and everything a method needs to turn it into a pruned one at
a budget: importance scores (`criteria.score`), the cost model (MACs / params as functions of one
keep ratio per unit), the budget, the search space on the channel grid, and the projection onto
it. Units are channel groups (`granularity='channel'`), prunable param leaves
('unstructured'), or leaves with a fixed n:m pattern ('nm').

Channel groups always come from `discover.discover_groups`: any model that `jax.make_jaxpr` can
trace, nothing pruning-specific in it. The batched evaluation masks the activations of the
traced program (`discover.hookless_apply`), training masks the params (`masks.channel_masks`),
and one function, `surgery.slice_variables`, cuts the dropped channels out of the variables:
`compact` re-runs the program at the new widths; the pipeline instead rebuilds a zoo model as a
narrower Flax module around the same sliced variables (`models.with_widths`). A `discovery`
with renamed groups (a zoo model's, named after its width arguments: `models.discovery`)
names the units.
Attention heads, FFN neurons and grouped-conv groups, which a `structure.ChannelGroup` cannot
express, are scored, masked and costed through their discovered members (a head group's keep
ratio is the fraction of heads kept).

`apply(params, batch_stats, x, *, train) -> (logits, new_batch_stats)` is the functional
convention of `models.FunctionalModel` (`batch_stats` may be `{}`); `functional(module)` makes it
for a Flax NNX module, `linen_apply(module)` for a Linen one.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import checks
from jaxprune import costs as costs_lib
from jaxprune import criteria as criteria_lib
from jaxprune import discover as discover_lib
from jaxprune import masks as masks_lib
from jaxprune import surgery
from jaxprune import train as train_lib
from jaxprune.search import budget as budget_lib
from jaxprune.search import controllers as controllers_lib
from jaxprune.search import evaluate as evaluate_lib
from jaxprune.search import loop as loop_lib
from jaxprune.search import space as space_lib

GRANULARITIES = ("channel", "unstructured", "nm")
SCOPES = ("layerwise", "global")
TARGETS = ("macs", "params")
SENSITIVITY_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# The checks of the config keys that are `Pruner`'s arguments (methods.make_pruner passes
# them) and `Pruner.search`'s (rounds, candidates: the pipeline's search phase passes them).
CONFIG_CHECKS = {
    "prune.granularity": checks.choice(GRANULARITIES),
    "prune.scope": checks.choice(SCOPES),
    "prune.target": checks.choice(TARGETS),
    "prune.criterion": checks.choice(criteria_lib.CRITERIA),
    "prune.sparsity": checks.number(
        0, 1, high_open=True, note=" (the fraction removed; 1.0 or above would remove everything)"),
    "search.lower": checks.number(0, 1, low_open=True,
                                  note=" (the smallest keep ratio of a group)"),
    "search.step": checks.number(0, 1, high_open=True,
                                 note=" (keep-ratio grid step; 0 = continuous)"),
    "search.rounds": checks.integer(1),
    "search.candidates": checks.integer(1),
}
OPTIONAL_CONFIG_CHECKS = {"prune.n": checks.integer(1), "prune.m": checks.integer(1),
                          "prune.channel_multiple": checks.integer(1)}


# ----------------------------------------------------------------------------------------------
# Functional adapters


def functional(module) -> tuple[Callable, dict, dict]:
    """`(apply, params, batch_stats)` of a Flax NNX module called as `module(x)`.

    `apply(params, batch_stats, x, *, train)` merges the state into the module, switches it
    to `module.train()` / `module.eval()` (BatchNorm on batch / running statistics, dropout
    on / off) and returns `(logits, new_batch_stats)`. Pure and jittable.
    """
    from flax import nnx

    graphdef, params, batch_stats = nnx.split(module, nnx.Param, nnx.BatchStat)

    def apply(params, batch_stats, x, *, train: bool):
        m = nnx.merge(graphdef, nnx.State(params), nnx.State(batch_stats))
        m.train() if train else m.eval()
        logits = m(x)
        return logits, (nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)) if train else batch_stats)

    return apply, nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


def linen_apply(module) -> Callable:
    """`apply(params, batch_stats, x, *, train)` of a Flax Linen module whose `__call__` takes
    `train` and keeps BatchNorm statistics in the `batch_stats` collection."""

    def apply(params, batch_stats, x, *, train: bool):
        variables = {"params": params, "batch_stats": batch_stats}
        if not train:
            return module.apply(variables, x, train=False), batch_stats
        logits, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, updates.get("batch_stats", batch_stats)

    return apply


def _eval_logits(apply: Callable) -> Callable:
    """`fn(variables, x) -> logits` (inference mode), the form discovery and surgery trace."""
    return lambda v, x: apply(v["params"], v["batch_stats"], x, train=False)[0]


def _choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; use one of {', '.join(allowed)}.")
    return value


class Trained(NamedTuple):
    """What `train_model` returns: the trained params and statistics, the masks, per-epoch history."""
    params: Any
    batch_stats: Any
    masks: Any
    history: list


@functools.lru_cache(maxsize=16)
def _trainer(apply, settings: train_lib.Settings, mean: tuple, std: tuple) -> train_lib.Trainer:
    """The `train.Trainer` of these settings, compiled once: masks are state and the rate and
    length are arguments, so every fine-tune of one model reuses it."""
    return train_lib.make_trainer(apply, settings, mean=None if mean is None else np.asarray(mean),
                                  std=None if std is None else np.asarray(std))


def train_model(apply: Callable, params, batch_stats, images, labels, *, epochs: int,
                key: jax.Array, masks=None, learning_rate: float = 0.05,
                batch_size: Optional[int] = None, weight_decay: Optional[float] = None,
                momentum: Optional[float] = None, augment: Optional[bool] = None,
                mean=0.0, std=1.0, precision: Optional[str] = None, progress: bool = False,
                warmup_epochs: float = 0.0,
                settings: Optional[train_lib.Settings] = None) -> Trained:
    """Trains `apply`'s model with `train.train`, the pipeline's training (its optimizer, its
    compiled step, the data on the device): by default SGD with Nesterov momentum 0.9, weight
    decay 5e-4, a cosine schedule and batches of 128 (`train.Settings()`); `settings` gives
    another set (`train.Settings.from_config(config)`: a pipeline config's), and `batch_size`,
    `weight_decay`, `momentum`, `augment` (random crop and flip), `precision` override single
    fields of it. With `masks` (bool, shaped like params) pruned weights stay exactly 0.
    `images` are normalised with `mean` / `std` inside the step (uint8 pixels with the
    dataset's statistics, or float inputs with the default 0 / 1; `mean=None`: used as they
    are, e.g. token ids). For checkpointed, resumable
    training pass a `checkpoint.Checkpointer` to `train.train`, as the pipeline does."""
    given = {"batch_size": batch_size, "weight_decay": weight_decay, "momentum": momentum,
             "augment": augment, "precision": precision}
    settings = (settings or train_lib.Settings())._replace(
        **{k: v for k, v in given.items() if v is not None})
    masks = masks_lib.ones_like(params) if masks is None else masks
    n = int(np.shape(images)[0])
    if n < settings.batch_size:
        raise ValueError(f"batch_size={settings.batch_size} is larger than the {n} training "
                         "examples.")
    stats = [None if v is None else tuple(np.ravel(v).tolist()) for v in (mean, std)]
    trainer = _trainer(apply, settings, *stats)
    result = train_lib.train(trainer, params, batch_stats, masks, images, labels,
                             epochs=int(epochs), learning_rate=float(learning_rate), key=key,
                             warmup_epochs=float(warmup_epochs), progress=progress,
                             phase="train")
    s = result.state
    return Trained(s.params, s.batch_stats, s.masks, result.history)


def score_in_chunks(evaluate: Callable, keeps, k: int) -> np.ndarray:
    """`evaluate(keep[k, G]) -> [k]` over any number of keep rows, `k` at a time; the last chunk
    is padded with copies of its last row, so the evaluator compiles once."""
    keeps = np.asarray(keeps, np.float32)
    k = max(int(k), 1)
    padded = np.concatenate([keeps, np.repeat(keeps[-1:], (-len(keeps)) % k, axis=0)])
    return np.concatenate([np.asarray(evaluate(padded[i:i + k]))
                           for i in range(0, len(padded), k)])[:len(keeps)]


# ----------------------------------------------------------------------------------------------
# The problem


class Pruner:
    """The pruning problem of one trained model at one budget (see the module docstring).

    Args:
      apply: `apply(params, batch_stats, x, *, train) -> (logits, new_batch_stats)`.
      params, batch_stats: the trained (dense) variables.
      input_shape: one example's shape, e.g. (32, 32, 3), or (seq_len,) of token ids.
      input_dtype: what `apply` takes: float32 (normalised images, the default) or an integer
        dtype (token ids: int32; used as they are, never normalised).
      discovery: the channel groups of `apply` at these variables' shapes as
        `discover.discover_groups` finds them, possibly renamed and reordered (a zoo model's:
        `models.discovery(model)`); None discovers them here. Channel granularity only.
      unprunable: param paths never pruned by the unstructured / n:m masks (e.g. the first
        conv and the classifier); channel groups that must not be pruned are left out by
        discovery itself.
      granularity: 'channel', 'unstructured' or 'nm'.
      sparsity: fraction of the dense `target` cost removed, in [0, 1).
      target: 'macs' or 'params'.
      criterion: any name of `criteria.CRITERIA`; `scores` overrides it with given scores
        (a `criteria.Scores`). Gradient criteria need `score_batches`, 'random' a `key`.
      score_batches: [(inputs, labels int)] for 'taylor' / 'snip' / 'mask_gradient' (inputs
        as `apply` takes).
      scope: 'layerwise' or 'global' (the threshold method's ranking).
      lower: smallest keep ratio of a unit; step: keep grid (0: continuous);
        channel_multiple: kept channel counts in whole multiples of it (channel only).
      n, m: the n:m pattern ('nm').
      key: PRNG key for the 'random' criterion.

    Raises:
      ValueError naming the bad argument; `budget.InfeasibleBudgetError` when the budget is
      below what `lower` allows.
    """

    def __init__(self, apply: Callable, params, batch_stats, input_shape: Sequence[int], *,
                 input_dtype=jnp.float32, discovery: Optional[discover_lib.Discovery] = None,
                 unprunable: Sequence = (),
                 granularity: str = "channel", sparsity: float = 0.5, target: str = "macs",
                 criterion: str = "l1", scores: Optional[criteria_lib.Scores] = None,
                 score_batches=None, scope: str = "layerwise", lower: float = 0.1,
                 step: float = 0.0, channel_multiple: int = 1, n: int = 2, m: int = 4,
                 key: Optional[jax.Array] = None):
        self.granularity = _choice("granularity", granularity, GRANULARITIES)
        self.scope = _choice("scope", scope, SCOPES)
        self.target = _choice("target", target, TARGETS)
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity={sparsity!r}; must be in [0, 1).")
        self.params, self.batch_stats = params, batch_stats if batch_stats is not None else {}
        self.input_shape = tuple(int(d) for d in input_shape)
        self.input_dtype = jnp.dtype(input_dtype)
        self._apply = apply  # the model's own apply (discovery and surgery trace it)
        self.discovery, self.apply, self.groups = None, apply, ()
        members = False
        if self.granularity == "channel":
            self.discovery, self._found, self._discovered = self._discover(discovery)
            # Groups a ChannelGroup cannot express (attention heads, grouped convs) stay
            # `discover.Group`s (`discover.params_groups`): masks, scores and costs read either
            # through its members; the pipeline's zoo paths need ChannelGroups otherwise.
            members = bool(self.discovery.inexpressible())
            self.groups = (discover_lib.params_groups(self.discovery) if members
                           else self.discovery.channel_groups())
            self.apply = self._masked_apply(apply)
        self.prunable_fn = masks_lib.make_prunable_fn(exclude=tuple(unprunable))
        if scores is None:
            def loss_fn(p, batch):  # for the gradient criteria: the loss on (inputs, labels)
                logits, _ = apply(p, self.batch_stats, batch[0], train=False)
                return jnp.mean(train_lib.cross_entropy(logits, batch[1]))

            def mask_loss_fn(channel_masks, batch):  # 'mask_gradient': d loss / d mask
                logits, _ = self.apply(params, self.batch_stats, batch[0], train=False,
                                       channel_masks=channel_masks)
                return jnp.mean(train_lib.cross_entropy(logits, batch[1]))
            scores = criteria_lib.score(criterion, params, groups=self.groups, loss_fn=loss_fn,
                                        batches=score_batches, key=key,
                                        mask_loss_fn=mask_loss_fn if self.groups else None)
        self.scores = scores.weights
        if self.granularity == "channel":
            if not self.groups:
                raise ValueError("granularity='channel' found no prunable channel group in this "
                                 "model; use granularity='unstructured'.")
            self.units = [g.name for g in self.groups]
            self.channel_scores = scores.channels if scores.channels is not None else \
                masks_lib.channel_scores(scores.weights, self.groups)
            self.cost = costs_lib.cost_model(self.apply, params, self.batch_stats,
                                             self.input_shape, self.groups,
                                             input_dtype=self.input_dtype,
                                             channel_macs=self._param_free_macs())
        else:
            if scores.weights is None:
                raise ValueError(f"criterion {criterion!r} scores channels only; use "
                                 "granularity='channel' or a weight criterion.")
            self.units = ["/".join(p) for p in masks_lib.prunable_paths(params, self.prunable_fn)]
            self.channel_scores = None
            self.cost = costs_lib.unstructured_cost_model(
                self.apply, params, self.batch_stats, self.input_shape,
                prunable_fn=self.prunable_fn, input_dtype=self.input_dtype)
        self.dense_cost = self.cost.dense_macs if self.target == "macs" else self.cost.dense_params
        self.budget_fn = self.cost.macs if self.target == "macs" else self.cost.params
        self.budget = float((1.0 - float(sparsity)) * self.dense_cost)
        g = len(self.units)
        lower_v = np.full((g,), float(lower), np.float32)
        self.step = float(step) or None
        if self.granularity == "channel":
            # Kept channel counts in whole multiples (odd widths leave most of the speed-up on
            # the table: XLA's conv kernels vectorise over channels), and in whole channels at
            # least: the masks round a continuous keep to channels, so a projection off the
            # grid would plan MACs the model does not have.
            # A group whose channels span several weights each (attention heads: head_dim)
            # keeps whole channels (heads) on its grid, whatever `channel_multiple`.
            sizes = np.asarray([gr.size for gr in self.groups], np.float32)
            shapes = {p: np.shape(x) for p, x in masks_lib.leaves_with_paths(params)[0]}
            multiple = np.asarray([1 if members and discover_lib.unit_width(gr, shapes) > 1
                                   else max(int(channel_multiple), 1) for gr in self.groups],
                                  np.float32)
            self.step = np.minimum(multiple / sizes, 1.0).astype(np.float32)
            lower_v = np.minimum(np.ceil(lower_v / self.step - 1e-5) * self.step,
                                 1.0).astype(np.float32)
        self.space = space_lib.SearchSpace.create(g, lower=lower_v, upper=1.0,
                                                  step=(float(step) or None), names=self.units)
        self.nm = (int(n), int(m))
        if self.granularity == "nm":
            masks_lib.check_nm(params, *self.nm, prunable_fn=self.prunable_fn)
        else:
            budget_lib.check_feasible(self.budget_fn, self.space.lower, self.budget,
                                      dense_cost=self.dense_cost)

    def _discover(self, named):
        """`(discovery, found, {group name: discovered name})`: `named` (or what discovery
        finds) and the groups as `discover_groups` named them, matched by their members."""
        variables = {"params": self.params, "batch_stats": self.batch_stats}
        x = jax.ShapeDtypeStruct((1, *self.input_shape), self.input_dtype)
        found = discover_lib.discover_groups(_eval_logits(self._apply), variables, x)
        named = found if named is None else named
        by_members = {frozenset(g.members): g.name for g in found.all_groups}
        missing = [g.name for g in named.all_groups if frozenset(g.members) not in by_members]
        if missing:
            raise ValueError(f"discovery groups {missing} are not groups of this model; give "
                             "the discovery of this apply at these variables' shapes.")
        return named, found, {g.name: by_members[frozenset(g.members)]
                              for g in named.all_groups}

    def _param_free_macs(self) -> Optional[list]:
        """Per group, the MACs per kept channel that no param leaf carries (attention's QK^T
        and AV shrink with the heads kept), or None when the program has none (convs and dense
        layers only): the param-free MACs of the dense program less those of the program
        compacted with one channel of the group dropped."""
        def param_free(fn, variables):
            apply = lambda p, s, x, *, train: (fn({"params": p, "batch_stats": s}, x), s)  # noqa: E731
            return costs_lib.param_free_macs(apply, variables["params"], variables["batch_stats"],
                                             self.input_shape, input_dtype=self.input_dtype)

        fn, variables = _eval_logits(self._apply), self._variables(None, None)
        dense = param_free(fn, variables)
        if dense == 0:
            return None
        out = []
        for g in self.groups:
            if g.size < 2:
                out.append(0)
                continue
            keep = {self._discovered[g.name]: np.arange(g.size) > 0}
            out.append(max(dense - param_free(*surgery.compact(fn, variables, self._found, keep)), 0))
        return out

    def _masked_apply(self, apply: Callable) -> Callable:
        """`apply(..., channel_masks={group name: float[size]})`: the activation masks of
        `discover.hookless_apply`, under this Pruner's group names."""
        hookless = discover_lib.hookless_apply(apply)
        if all(k == v for k, v in self._discovered.items()):
            return hookless

        def masked(params, batch_stats, x, *, train: bool, channel_masks=None):
            found = {self._discovered[k]: v for k, v in (channel_masks or {}).items()}
            return hookless(params, batch_stats, x, train=train, channel_masks=found)

        return masked

    # -- keep vectors ----------------------------------------------------------------------
    def project(self, keep) -> np.ndarray:
        """`keep` float32[G] (or a batch [K, G]) moved onto the grid and under the budget,
        filling it; one compiled projection per batch shape."""
        keep = jnp.asarray(keep, jnp.float32)
        out = self._project(keep[None] if keep.ndim == 1 else keep)
        return np.asarray(out[0] if keep.ndim == 1 else out)

    @functools.cached_property
    def _project(self) -> Callable:
        return jax.jit(lambda keep: budget_lib.project(
            keep, self.budget_fn, self.budget, self.space.lower, self.space.upper,
            step=self.step))

    def masks(self, keep):
        """`(masks, channel_keep)`: boolean masks shaped like params for the keep vector, and
        (channel granularity) the kept channels {group: bool[size]}, else None."""
        keep = jnp.asarray(keep, jnp.float32)
        if self.granularity == "channel":
            channel_keep = masks_lib.channel_keep(self.channel_scores, keep, self.groups)
            return masks_lib.channel_masks(channel_keep, self.groups, self.params), channel_keep
        if self.granularity == "nm":
            n, m = self.nm
            return masks_lib.from_scores(self.scores, None, granularity="nm", n=n, m=m,
                                         prunable_fn=self.prunable_fn), None
        return masks_lib.from_scores(self.scores, keep, scope="layerwise",
                                     granularity=self.granularity,
                                     prunable_fn=self.prunable_fn), None

    masks_for = masks  # the name of earlier releases

    # -- batched proxy evaluation ------------------------------------------------------------
    def evaluator(self, calib_images, val_images, val_labels, *, calib_batch_size: Optional[int] = None,
                  eval_batch_size: Optional[int] = None, chunk_size: Optional[int] = None,
                  precision: str = "fp32", metric: str = "accuracy") -> Callable:
        """`evaluate(keep float32[K, G]) -> float32[K]`: each candidate's `metric` ('accuracy' or
        'loss') on the validation arrays after BatchNorm recalibration on `calib_images` (None:
        no recalibration), all K in one compiled call, vmapped and sharded over the devices.
        Inputs are as `apply` takes them (`input_dtype`: normalised float32 images, or token
        ids)."""
        _choice("metric", metric, ("accuracy", "loss"))
        mode = "channel" if self.granularity == "channel" else "unstructured"
        evaluate = evaluate_lib.make_evaluator(
            train_lib.mixed_apply(self.apply, precision), self.groups, mode=mode,
            chunk_size=chunk_size, eval_batch_size=eval_batch_size,
            calib_batch_size=calib_batch_size, prunable_fn=self.prunable_fn)
        scores = self.channel_scores if mode == "channel" else self.scores
        calib = None if calib_images is None else jnp.asarray(calib_images, self.input_dtype)
        val_x, val_y = jnp.asarray(val_images, self.input_dtype), jnp.asarray(val_labels)

        def evaluate_fn(keep):
            return evaluate(self.params, self.batch_stats, scores,
                            jnp.asarray(keep, jnp.float32), calib, val_x, val_y)[metric]

        return evaluate_fn

    # -- the hand-set keeps ------------------------------------------------------------------
    def threshold_keep(self) -> np.ndarray:
        """Magnitude ("threshold") pruning at the budget: a uniform keep per unit (layer-wise)
        or one global threshold over the (channel-normalised) scores, its kept fraction bisected
        so the per-unit keeps it implies meet the budget; n:m: n / m everywhere."""
        g = len(self.units)
        if self.granularity == "nm":
            n, m = self.nm
            return np.full((g,), n / m, np.float32)
        if self.scope == "layerwise":
            return self.project(np.ones((g,), np.float32))
        if self.granularity == "channel":
            def unit_keep(fraction):
                keep = masks_lib.channel_keep_global(self.channel_scores, fraction, self.groups)
                return jnp.stack([jnp.mean(keep[name].astype(jnp.float32)) for name in self.units])
        else:
            paths = masks_lib.prunable_paths(self.params, self.prunable_fn)

            def unit_keep(fraction):
                masks = masks_lib.from_scores(self.scores, fraction, scope="global",
                                              granularity="unstructured",
                                              prunable_fn=self.prunable_fn)
                flat = dict(masks_lib.leaves_with_paths(masks)[0])
                return jnp.stack([jnp.mean(flat[p].astype(jnp.float32)) for p in paths])

        unit_keep = jax.jit(unit_keep)
        lower = jnp.asarray(self.space.lower)

        def keep_at(fraction):
            return jnp.maximum(unit_keep(jnp.float32(fraction)), lower)

        lo, hi = 1e-3, 1.0
        for _ in range(25):
            mid = 0.5 * (lo + hi)
            if float(self.budget_fn(keep_at(mid))) <= self.budget:
                lo = mid
            else:
                hi = mid
        return self.project(np.asarray(keep_at(lo)))

    def sensitivity_keep(self, evaluate: Callable, *, candidates: int = 64,
                         grid: Sequence[float] = SENSITIVITY_GRID):
        """Sensitivity pruning: each unit pruned alone at every keep of `grid` (scored `candidates`
        at a time by `evaluate`, the last batch padded so it compiles once), then each unit gets
        the smallest keep whose drop stays under a tolerance bisected to meet the budget.
        Returns `(keep, criteria.SensitivityCurves)`."""
        grid = np.asarray(grid, np.float32)
        grid = grid[grid >= float(self.space.lower[0]) - 1e-6]
        g = len(self.units)
        cand = np.ones((1 + g * grid.size, g), np.float32)  # row 0: the dense model
        for i in range(g):
            cand[1 + i * grid.size:1 + (i + 1) * grid.size, i] = grid
        acc = score_in_chunks(evaluate, cand, candidates)
        curves = criteria_lib.SensitivityCurves(
            units=tuple(self.units), keep_grid=grid,
            values=acc[1:].reshape(g, grid.size).astype(np.float64), dense=float(acc[0]))
        chosen = criteria_lib.sensitivity_to_keep(
            curves, lambda keep: float(self.budget_fn(jnp.asarray(keep))), self.budget)
        return self.project(chosen.keep_ratios), curves

    # -- search ------------------------------------------------------------------------------
    def search(self, method: str, evaluate: Callable, *, key: jax.Array, rounds: int = 8,
               candidates: int = 16, hparams: Optional[dict] = None, seeds=None,
               checkpointer=None, name: Optional[str] = None, progress: bool = False,
               writer=None) -> loop_lib.SearchResult:
        """Runs the controller `method` (`search.controllers.CONTROLLERS`) for `rounds` rounds of
        `candidates` keep vectors, each projected under the budget and scored by `evaluate`;
        resumes from `checkpointer` if it holds a step. Returns a `loop.SearchResult`
        (`best_keep`, `best_accuracy`, the log of every candidate)."""
        controller = controllers_lib.get_controller(method, seeds=seeds, **(hparams or {}))
        return loop_lib.run(
            controller, self.space, key=key, rounds=int(rounds), k=int(candidates),
            evaluate_fn=evaluate, macs_fn=self.cost.macs, params_fn=self.cost.params,
            budget=self.budget, budget_fn=self.budget_fn, checkpointer=checkpointer,
            name=name or method, progress=progress, writer=writer, step=self.step)

    # -- the pruned model --------------------------------------------------------------------
    def finetune(self, keep, images, labels, *, epochs: int, key: jax.Array, **kwargs) -> Trained:
        """`train_model` (the pipeline's training) of the dense model masked at `keep`: pruned
        weights stay exactly 0. The model's own apply is trained (the masks are on the params).
        Inputs of an integer `input_dtype` (token ids) are not normalised."""
        if jnp.issubdtype(self.input_dtype, jnp.integer):
            kwargs = {"mean": None, "std": None, **kwargs}
        return train_model(self._apply, self.params, self.batch_stats, images, labels,
                           epochs=epochs, key=key, masks=self.masks(keep)[0], **kwargs)

    def channel_keep(self, keep) -> dict:
        """The kept channels {group: bool[size]} of a channel keep vector (numpy)."""
        if self.granularity != "channel":
            raise ValueError(f"channel_keep needs granularity='channel', not {self.granularity!r}.")
        kept = masks_lib.channel_keep(self.channel_scores, jnp.asarray(keep, jnp.float32),
                                      self.groups)
        return {k: np.asarray(v) for k, v in kept.items()}

    def _variables(self, params, batch_stats) -> dict:
        return {"params": self.params if params is None else params,
                "batch_stats": self.batch_stats if batch_stats is None else batch_stats}

    def compact(self, keep, params=None, batch_stats=None):
        """`(compact_apply, compact_variables)`: the model with the channels dropped at `keep`
        removed (default: the dense variables). `compact_apply(compact_variables, x) -> logits`
        equals the masked model's output; `modelio.save_compact` /
        `modelio.load_compact` store and restore it."""
        found = {self._discovered[k]: v for k, v in self.channel_keep(keep).items()}
        return surgery.compact(_eval_logits(self._apply), self._variables(params, batch_stats),
                               self._found, found)
