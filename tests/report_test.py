"""Result table, metric log and plots."""
import json
import os

import numpy as np

from jaxprune import report


ROWS = [
    {"method": "unpruned", "accuracy": 0.9123, "params": 272474, "macs": 41000000, "size_mb": 1.09,
     "train_seconds": 100.0, "latency_ms": 2.5, "sparsity": 0.0},
    {"method": "threshold", "accuracy": 0.9011, "params": 136000, "macs": 20500000, "size_mb": 0.54,
     "train_seconds": 50.0, "latency_ms": 1.4, "sparsity": 0.5008},
]


def test_write_results_json_and_markdown(tmp_path):
    report.write_results(str(tmp_path), ROWS, note="MACs per example")
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in rows] == ["unpruned", "threshold"]
    required = {"method", "accuracy", "params", "macs", "size_mb", "train_seconds", "latency_ms",
                "sparsity"}
    assert required <= set(rows[0])
    md = (tmp_path / "results.md").read_text()
    assert "| threshold | 90.11 | 136,000 | 20,500,000 |" in md
    assert "MACs per example" in md


def test_table_text_aligns_and_marks_missing():
    text = report.table_text(ROWS + [{"method": "x", "accuracy": None}])
    lines = text.splitlines()
    assert len({len(l) for l in lines[:4]}) == 1  # header, rule, rows of equal width
    assert "—" in lines[-1]


def test_pareto_front():
    macs = np.array([1.0, 2.0, 3.0, 2.0, 4.0])
    acc = np.array([0.5, 0.7, 0.6, 0.4, 0.9])
    assert report.pareto_front(macs, acc).tolist() == [0, 1, 4]


def test_metric_writer_appends_jsonl(tmp_path):
    w = report.MetricWriter(str(tmp_path))
    w.write(1, {"phase": "dense", "loss": 1.5})
    w.write(2, {"phase": "dense", "loss": 1.2})
    w.close()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2] and lines[1]["loss"] == 1.2
    assert os.listdir(tmp_path / "tensorboard")


def test_plots_have_the_right_series(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []  # each figure as the plot function leaves it, before it is closed
    monkeypatch.setattr(plt, "close", figures.append)
    logs = {"random": {"macs": [1e6, 2e6, 3e6], "accuracy": [0.5, 0.6, 0.55]},
            "reinforce": {"macs": [1.5e6, 2.5e6], "accuracy": [0.58, 0.7]}}
    report.plot_search(str(tmp_path / "p.png"), logs, dense_macs=4e6, budget_macs=2.5e6)
    report.plot_keep_ratios(str(tmp_path / "k.png"), ["a", "b", "c"],
                            {"random": [0.5, 0.6, 0.7], "reinforce": [1.0, 0.3, 0.5]})
    for name in ("p.png", "k.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    search, keeps = (fig.axes[0] for fig in figures)
    # search: one scatter per method (MACs in M, accuracy in %), the Pareto front, the budget
    points = {c.get_label(): c.get_offsets() for c in search.collections}
    np.testing.assert_allclose(points["random"], [[1, 50], [2, 60], [3, 55]])
    np.testing.assert_allclose(points["reinforce"], [[1.5, 58], [2.5, 70]])
    lines = {l.get_label(): np.asarray(l.get_xydata()) for l in search.lines}
    np.testing.assert_allclose(lines["Pareto front"], [[1, 50], [1.5, 58], [2, 60], [2.5, 70]])
    np.testing.assert_allclose(lines["budget"][:, 0], 2.5)
    assert "dense 4.00 M" in search.get_xlabel()
    # keep ratios: one bar per group and method, the winner's keep ratio as its height
    heights = {}
    for container in keeps.containers:
        heights[container.get_label()] = [bar.get_height() for bar in container]
    assert heights == {"random": [0.5, 0.6, 0.7], "reinforce": [1.0, 0.3, 0.5]}
    assert [t.get_text() for t in keeps.get_xticklabels()] == ["a", "b", "c"]


def test_results_json_is_strict(tmp_path):
    rows = [dict(ROWS[0], accuracy=float("nan"), latency_ms=np.float32("inf"),
                 keep=np.asarray([0.5, np.nan], np.float32))]
    report.write_results(str(tmp_path), rows)
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    row = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))[0]
    assert row["accuracy"] is None and row["latency_ms"] is None and row["keep"] == [0.5, None]
    w = report.MetricWriter(str(tmp_path), tensorboard=False)
    w.write(1, {"loss": float("nan")})
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] is None


def test_partial_table_never_replaces_a_fuller_one(tmp_path):
    full = ROWS + [dict(ROWS[1], method="random", accuracy=0.8)]
    report.write_results(str(tmp_path), full)
    # a rerun that stopped after the first method: the other rows stay, the new one replaces its own
    merged = report.write_results(str(tmp_path), [dict(ROWS[0], latency_ms=9.0)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == merged and [r["method"] for r in saved] == ["unpruned", "threshold", "random"]
    assert saved[0]["latency_ms"] == 9.0 and saved[2]["accuracy"] == 0.8
    assert "| random |" in (tmp_path / "results.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]  # no temporary files
