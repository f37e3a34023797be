"""Each run of this study against the same run (method, seed) of the 30 % study: the same search
log and fine-tune data order, the winner picked by the selection here and by the best 500-image
proxy there. Prints the paired differences of fine-tuned test accuracy per method (markdown)."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))
from search_quality import paired_difference  # noqa: E402


def main() -> None:
    with open(os.path.join(HERE, "..", "2026-11-30_search_quality_r20", "results.json")) as f:
        plain = json.load(f)["resnet20_30pct"]
    with open(os.path.join(HERE, "results.json")) as f:
        selected = json.load(f)["resnet20_30pct_selected"]
    by = {(r["method"], r["seed"]): r for r in plain["runs"]}
    pp = lambda v: f"{100 * v:+.2f}"  # noqa: E731
    print("| method | seeds | same winner | selected − best proxy, test (points) | t 95 % "
          "| bootstrap 95 % | Wilcoxon p | wins/ties/losses |")
    print("|---|---|---|---|---|---|---|---|")
    for method in selected["methods"]:
        runs = [r for r in selected["runs"] if r["method"] == method and r["seed"] in selected["seeds"]]
        before = [by[method, r["seed"]] for r in runs]
        same = sum(r["selected_keep"] == b["best_keep"] for r, b in zip(runs, before))
        d = paired_difference([r["finetuned"]["test_accuracy"] for r in runs],
                              [b["finetuned"]["test_accuracy"] for b in before])
        print(f"| {method} | {d['n']} | {same} | {pp(d['mean'])} | [{pp(d['t95'][0])}, "
              f"{pp(d['t95'][1])}] | [{pp(d['ci95'][0])}, {pp(d['ci95'][1])}] "
              f"| {d['wilcoxon_p']:.3f} | {d['wins']}/{d['ties']}/{d['losses']} |")


if __name__ == "__main__":
    main()
