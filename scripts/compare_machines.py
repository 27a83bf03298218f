"""Compare one experiment's runs from two machines: same code, backbone file and data, another CPU.

    python scripts/compare_machines.py runs/default/vtab reports/gpu/vtab_16cores_runs.csv > reports/gpu/cross_machine.md

The first argument is an experiment's runs folder (<method>/results.json); the second a CSV of the other machine's runs
(method, task, seed, test_acc_val: test accuracy under protocol `val`). Prints, in Markdown, how many runs came out
identical, the largest difference of one run, and per method the difference of each task's seed mean and of their mean
(points): the cross-machine tolerance below which a comparison of methods cannot be trusted across machines.
"""
import csv
import json
import statistics
import sys
from pathlib import Path


def main(runs_dir: str, other_csv: str) -> None:
    other = {(r["method"], r["task"], int(r["seed"])): float(r["test_acc_val"]) for r in csv.DictReader(open(other_csv))}
    ours = {(result["method"], run["task"], run["seed"]): run["summary"]["val"]["test_acc"]
            for path in sorted(Path(runs_dir).glob("*/results.json")) for result in [json.loads(path.read_text())]
            for run in result["runs"]}
    shared = sorted(set(other) & set(ours))
    diffs = {key: 100 * (other[key] - ours[key]) for key in shared}
    identical = sum(abs(d) < 1e-9 for d in diffs.values())
    tasks = list(dict.fromkeys(task for _, task, _ in shared))
    print(f"# Cross-machine differences: {runs_dir} against {other_csv}\n")
    print(f"{len(shared)} runs on both machines; {identical} identical; the largest difference of one run "
          f"{max(map(abs, diffs.values())):.1f} points (test accuracy, protocol `val`; other machine minus this one).\n")
    print("| method | " + " | ".join(tasks) + " | mean |")
    print("|---|" + "---|" * (len(tasks) + 1))
    worst = 0.0
    for method in sorted({m for m, _, _ in shared}):
        cells = [statistics.fmean(d for (m, t, _), d in diffs.items() if m == method and t == task) for task in tasks]
        worst = max(worst, abs(statistics.fmean(cells)))
        print(f"| {method} | " + " | ".join(f"{c:+.2f}" for c in cells) + f" | {statistics.fmean(cells):+.2f} |")
    print(f"\nLargest difference of a method's mean over tasks: {worst:.2f} points.")


if __name__ == "__main__":
    main(*sys.argv[1:3])
