"""Reports: the results table (terminal, markdown, JSON), metrics logs and plots.

Rows are plain dicts with the keys of `COLUMNS`; MACs are multiply-accumulates per example.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import numpy as np

from jaxprune import files

# (key, header, format)
COLUMNS = (
    ("method", "method", "{}"),
    ("accuracy", "test acc (%)", "{:.2f}"),
    ("params", "params", "{:,}"),
    ("macs", "MACs", "{:,}"),
    ("size_mb", "size (MB)", "{:.3f}"),
    ("train_seconds", "train (s)", "{:.0f}"),
    ("latency_ms", "latency (ms)", "{:.2f}"),
    ("sparsity", "sparsity (%)", "{:.1f}"),
)


def _cell(row, key, fmt):
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if key in ("accuracy", "sparsity"):
        value = 100.0 * value
    return fmt.format(value)


def table_markdown(rows: Sequence[dict], note: str = "") -> str:
    """A GitHub-markdown table of result rows (accuracy and sparsity shown in %)."""
    header = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, k, f) for k, _, f in COLUMNS) + " |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def table_text(rows: Sequence[dict]) -> str:
    """The same table, aligned for a terminal."""
    cells = [[h for _, h, _ in COLUMNS]] + [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    out = []
    for j, row in enumerate(cells):
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"


def read_results(workdir: str) -> list:
    """The rows of `workdir/results.json`, or [] when there is none (or it cannot be read)."""
    try:
        with open(os.path.join(workdir, "results.json")) as f:
            rows = json.load(f)
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict) and "method" in r] if isinstance(rows, list) else []


def merge_rows(old: Sequence[dict], new: Sequence[dict]) -> list:
    """`new`'s rows in their order, then the rows of `old` whose method `new` lacks: a table
    written part-way through a run (or by a run of fewer methods) never loses a finished row."""
    have = {r["method"] for r in new}
    return list(new) + [r for r in old if r["method"] not in have]


def write_results(workdir: str, rows: Sequence[dict], note: str = "") -> list:
    """Merges `rows` into `results.json` (by method, see `merge_rows`) and writes it and
    `results.md`, each atomically; returns the rows written. JSON is strict: NaN and
    infinities are written as null."""
    merged = merge_rows(read_results(workdir), [strict_json(dict(r)) for r in rows])
    files.write_text(os.path.join(workdir, "results.json"),
                  json.dumps(merged, indent=2, allow_nan=False) + "\n")
    files.write_text(os.path.join(workdir, "results.md"), table_markdown(merged, note))
    return merged


def strict_json(value):
    """A plain-JSON copy: numpy numbers and arrays become Python ones, NaN / inf become None."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return strict_json(np.asarray(value).tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        return strict_json(np.asarray(value).tolist())  # jax arrays
    return value


def write_text(path: str, text: str) -> None:
    """Writes a text file atomically."""
    files.write_text(path, text)


class MetricWriter:
    """Appends metric dicts to `workdir/metrics.jsonl` and to TensorBoard (`workdir/tensorboard`)."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # tensorboardX is a dependency; keep the jsonl log regardless
                self._tb = None

    def write(self, step: int, record: dict) -> None:
        with open(self._path, "a") as f:
            f.write(json.dumps(strict_json(dict(record, step=int(step)))) + "\n")
        if self._tb is not None:
            prefix = record.get("phase", "")
            for key, value in record.items():
                if isinstance(value, (int, float, np.floating, np.integer)) and key != "step":
                    self._tb.add_scalar(f"{prefix}/{key}" if prefix else key, float(value), int(step))
            self._tb.flush()

    def write_summary(self, config: dict, metrics: dict, text: Optional[dict] = None,
                      images: Optional[dict] = None) -> None:
        """TensorBoard at the end of a run: `config` (nested dict) flattened into hparams with
        `metrics` (name → number) beside them, `text` (tag → markdown) and `images` (tag → PNG
        path; missing files are skipped)."""
        if self._tb is None:
            return
        hparams = {k: _hparam_value(v) for k, v in flatten(config).items()}
        values = {f"hparam/{k}": float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float, np.number)) and math.isfinite(float(v))}
        self._tb.add_hparams(hparams, values, name="hparams")
        for tag, markdown in (text or {}).items():
            self._tb.add_text(tag, markdown, 0)
        for tag, path in (images or {}).items():
            if os.path.isfile(path):
                from PIL import Image

                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self._tb.add_image(tag, pixels, 0, dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} → {'a.b': 1} (config keys as written on the command line)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _hparam_value(value):
    """TensorBoard hparams take bool, int, float or str; anything else (None, lists) as text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def pareto_front(macs: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Indices of the candidates no other candidate beats on both fewer MACs and higher accuracy."""
    order = np.lexsort((-accuracy, macs))
    front, best = [], -np.inf
    for i in order:
        if accuracy[i] > best:
            front.append(i)
            best = accuracy[i]
    return np.asarray(front, dtype=np.int64)


def plot_search(path: str, logs: dict, dense_macs: Optional[float] = None,
                budget_macs: Optional[float] = None) -> None:
    """Proxy accuracy vs MACs of every candidate, one colour per method, Pareto front marked.

    logs: method -> dict(macs=[...], accuracy=[...]).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    all_macs, all_acc = [], []
    for i, (method, log) in enumerate(sorted(logs.items())):
        macs = np.asarray(log["macs"], np.float64) / 1e6
        acc = 100 * np.asarray(log["accuracy"], np.float64)
        ax.scatter(macs, acc, s=10, alpha=0.5, color=f"C{i}", label=method)
        all_macs.append(macs)
        all_acc.append(acc)
    if all_macs:
        m, a = np.concatenate(all_macs), np.concatenate(all_acc)
        front = pareto_front(m, a)
        ax.plot(m[front], a[front], "k-", lw=1.2, marker="o", ms=4, mfc="none", label="Pareto front")
    if budget_macs is not None:
        ax.axvline(budget_macs / 1e6, color="grey", ls="--", lw=1, label="budget")
    ax.set_xlabel("MACs (M)" + (f" — dense {dense_macs / 1e6:.2f} M" if dense_macs else ""))
    ax.set_ylabel("proxy accuracy (%, validation, adaptive BN)")
    ax.set_title("Search: every evaluated candidate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_keep_ratios(path: str, group_names: Sequence[str], keeps: dict) -> None:
    """Per-group keep ratios of each method's winner (bars)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(group_names)
    methods = sorted(keeps)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) * max(1, len(methods)) / 2), 4))
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(names))
    for i, method in enumerate(methods):
        ax.bar(x + i * width - 0.4 + width / 2, np.asarray(keeps[method]), width, label=method,
               color=f"C{i}")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("keep ratio")
    ax.set_title("Per-group keep ratios of each winner")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
