"""benchmarks/search_quality.py: the paired statistics, and a tiny study with fine-tuned winners."""
import glob
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import search_quality  # noqa: E402


def test_paired_difference_statistics():
    a = np.array([0.52, 0.55, 0.50, 0.58, 0.54, 0.57])
    b = a - np.array([0.01, 0.02, 0.0, 0.03, 0.01, 0.02])
    d = search_quality.paired_difference(a, b, resamples=2000)
    assert d["n"] == 6 and (d["wins"], d["ties"], d["losses"]) == (5, 1, 0)
    assert d["mean"] == pytest.approx(0.015)
    lo, hi = d["ci95"]
    assert 0.0 < lo < d["mean"] < hi <= 0.03            # all differences >= 0: interval above zero
    assert 0.0 < d["wilcoxon_p"] < 0.1
    assert d["t95"][0] < d["mean"] < d["t95"][1]
    assert d["t95"][1] - d["t95"][0] > hi - lo         # t is the wider (more careful) interval
    swapped = search_quality.paired_difference(b, a, resamples=2000)
    assert swapped["mean"] == pytest.approx(-d["mean"])
    assert swapped["ci95"][1] < 0 and swapped["wilcoxon_p"] == pytest.approx(d["wilcoxon_p"])
    same = search_quality.paired_difference(a, a)
    assert same["ci95"] == [0.0, 0.0] and same["wilcoxon_p"] == 1.0 and same["ties"] == 6
    with pytest.raises(ValueError, match="at least 2 seeds"):
        search_quality.paired_difference([0.5], [0.4])


def _run(method, seed, best, test=None):
    run = {"method": method, "seed": seed, "best_accuracy": best}
    if test is not None:
        run["finetuned"] = {"test_accuracy": test}
    return run


def test_paired_table_pairs_by_seed_and_skips_missing_metrics():
    runs = [_run("random", s, 0.5, 0.60) for s in (0, 1, 2)] + [
        _run("evolution", s, 0.5 + 0.01 * (s + 1), 0.60 + 0.02 * (s + 1)) for s in (0, 2, 1, 3)]
    table = search_quality.paired_table(runs, ["random", "evolution"], "random", 500)
    ev = table["evolution"]
    assert ev["seeds"] == [0, 1, 2]                      # seed 3 has no random run to pair with
    assert ev["best proxy"]["mean"] == pytest.approx(0.02)
    assert ev["fine-tuned, test"]["mean"] == pytest.approx(0.04)
    assert "fine-tuned, unseen val" not in ev and "proxy on holdout" not in ev
    assert search_quality.paired_table(runs, ["evolution"], "random", 500) == {}


def test_proxy_fidelity_over_winners():
    truth = [0.50, 0.52, 0.55, 0.61, 0.58]
    runs = [_run("random", s, 0.2 + t / 10, t) for s, t in enumerate(truth)]   # same order
    runs[0]["holdout_accuracy"] = 0.3                                         # not every run
    fidelity = search_quality.proxy_fidelity(runs, 200)
    assert set(fidelity) == {"best proxy"}
    assert fidelity["best proxy"]["spearman"] == pytest.approx(1.0)
    assert fidelity["best proxy"]["kendall"] == pytest.approx(1.0) and fidelity["best proxy"]["n"] == 5
    runs = [_run("random", s, 0.9 - t, t) for s, t in enumerate(truth)]      # reversed
    assert search_quality.proxy_fidelity(runs, 200)["best proxy"]["spearman"] == pytest.approx(-1.0)
    assert search_quality.proxy_fidelity(runs[:3], 200) == {}                # too few winners


@pytest.mark.slow
def test_study_fine_tunes_winners_on_one_data_order_per_seed(tmp_path):
    out = tmp_path / "study.json"
    root = os.path.join(os.path.dirname(__file__), "..")
    args = ["--config", os.path.join(root, "configs", "quickstart.py"), "--workdir", str(tmp_path / "work"),
            "--seeds", "0,1", "--methods", "random,evolution", "--rounds", "1",
            "--candidates", "4", "--finetune", "--set", "finetune.epochs=1",
            "--set", "search.val_examples=200", "--quiet", "--resamples", "200",
            "--out", str(out), "--name", "tiny", "--plot", str(tmp_path / "plot.png")]
    search_quality.main(args)
    study = json.loads(out.read_text())["tiny"]
    assert study["complete"] and study["seeds"] == [0, 1]
    assert study["unseen_val_examples"] == 100       # digits: 300 val images, 200 searched
    for run in study["runs"]:
        ft = run["finetuned"]
        assert 0.0 < ft["test_accuracy"] <= 1.0 and 0.0 < ft["unseen_val_accuracy"] <= 1.0
    assert "finetuned" in study["uniform_at_budget"]
    paired = study["paired"]["evolution"]
    assert paired["reference"] == "random" and paired["seeds"] == [0, 1]
    assert set(paired) >= {"best proxy", "fine-tuned, unseen val", "fine-tuned, test"}
    fidelity = study["proxy_vs_finetuned"]  # 4 winners: proxy vs fine-tuned test
    assert "fine-tuned, unseen val" in fidelity
    assert all(-1 <= c["spearman"] <= 1 and c["n"] == 4 for c in fidelity.values())
    assert (tmp_path / "plot.png").stat().st_size > 0
    # Statistics re-read from the stored study, against another reference; nothing re-run.
    search_quality.main(["--reanalyse", "--out", str(out), "--name", "tiny", "--reference",
                         "evolution", "--resamples", "200"])
    flipped = json.loads(out.read_text())["tiny"]["paired"]["random"]["fine-tuned, test"]
    assert flipped["mean"] == pytest.approx(-paired["fine-tuned, test"]["mean"])
    assert flipped["n"] == 2
    with pytest.raises(SystemExit, match="holds no study 'other'"):
        search_quality.main(["--reanalyse", "--out", str(out), "--name", "other"])
    # Re-running the command resumes: searches and fine-tunes are restored, nothing changes.
    search_quality.main(args)
    again = json.loads(out.read_text())["tiny"]
    assert [r["finetuned"] for r in again["runs"]] == [r["finetuned"] for r in study["runs"]]
    # Another budget in the same workdir: its own searches and fine-tunes, nothing restored from
    # the first study's (whose checkpoints would not match it).
    search_quality.main([*args[:4], "--seeds", "0", "--methods", "random", "--rounds", "1",
                         "--candidates", "4", "--finetune", "--set", "finetune.epochs=1",
                         "--set", "search.val_examples=200", "--quiet", "--resamples", "200",
                         "--sparsity", "0.3", "--out", str(out), "--name", "other_budget"])
    other = json.loads(out.read_text())["other_budget"]
    assert other["sparsity"] == 0.3 and other["complete"]
    assert other["uniform_at_budget"]["macs_fraction"] > study["uniform_at_budget"]["macs_fraction"]
    assert "finetuned" in other["uniform_at_budget"] and "finetuned" in other["runs"][0]
    # Successive halving picks each winner, the same stages for every method. The fine-tunes are
    # judged on the images neither the proxy (200) nor the selection (250) scored, in folders of
    # their own, so the first study's fine-tunes (of the best-proxy winners) are not restored.
    search_quality.main([*args[:-6], "--set", "search.select_top=3",
                         "--set", "search.select_val_examples=250",
                         "--set", "search.select_finetune=1", "--out", str(out), "--name", "selected"])
    selected = json.loads(out.read_text())["selected"]
    assert selected["unseen_val_examples"] == 50
    assert selected["selection"] == {"select_top": 3, "select_val_examples": 250,
                                     "select_finetune": 1, "select_epochs": 1}
    for run, plain in zip(selected["runs"], study["runs"]):
        assert run["best_keep"] == plain["best_keep"]  # the same searches, restored
        validation, short = run["selection"]
        assert 1 <= len(validation["rows"]) <= 3 and len(short["rows"]) == 1
        assert run["selection_score"] == max(short["scores"])
        assert run["finetuned"]["unseen_val_accuracy"] > 0.0
    assert "selection score" in selected["paired"]["evolution"]
    assert "selection score" in selected["proxy_vs_finetuned"]
    folders = glob.glob(str(tmp_path / "work" / "checkpoints" / "search_quality" / "ft_*_sel3v250f1e1"))
    assert len(folders) == 4  # 2 methods x 2 seeds
