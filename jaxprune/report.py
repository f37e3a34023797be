"""Reports: the results table (terminal, markdown, JSON), metrics logs and plots.

Rows are plain dicts with the keys of `COLUMNS`; MACs are multiply-accumulates per example.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Optional, Sequence

import numpy as np

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


def write_results(workdir: str, rows: Sequence[dict], note: str = "") -> None:
    """Writes `results.json` (list of rows) and `results.md` atomically."""
    _atomic_write(os.path.join(workdir, "results.json"), json.dumps(list(rows), indent=2, default=_json))
    _atomic_write(os.path.join(workdir, "results.md"), table_markdown(rows, note))


def _json(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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
            f.write(json.dumps(dict(record, step=int(step)), default=_json) + "\n")
        if self._tb is not None:
            prefix = record.get("phase", "")
            for key, value in record.items():
                if isinstance(value, (int, float, np.floating, np.integer)) and key != "step":
                    self._tb.add_scalar(f"{prefix}/{key}" if prefix else key, float(value), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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
