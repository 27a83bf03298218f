"""Compare one experiment's runs from two machines: same code and recipe, another CPU (and, for a local backbone, the
backbone that CPU pre-trained).

    python scripts/compare_machines.py runs/default/vtab reports/gpu/vtab_16cores_runs.csv > reports/gpu/cross_machine.md

The first argument is an experiment's runs folder (<method>/results.json); the second the other machine's runs: a CSV with
columns method, task, seed and either test_acc_val (test accuracy under protocol `val`) or protocol and test_acc (a report's
results.csv, whose `val` rows are read). Prints, in Markdown, how many runs came out identical, the largest difference of
one run, per method the difference of each task's seed mean and of their mean (points), and per pair of methods how far
their paired difference (mean over tasks) moved: what the report's decision rule compares with the tolerance, since a
method-mean shift shared by both methods of a pair does not move their comparison.
"""
import csv
import itertools
import json
import statistics
import sys
from pathlib import Path


def read_other(path: str) -> dict[tuple[str, str, int], float]:
    "The other machine's test accuracy under protocol `val` per (method, task, seed)."
    rows = list(csv.DictReader(open(path)))
    if rows and "test_acc_val" in rows[0]:
        return {(r["method"], r["task"], int(r["seed"])): float(r["test_acc_val"]) for r in rows}
    if rows and {"protocol", "test_acc"} <= set(rows[0]):
        return {(r["method"], r["task"], int(r["seed"])): float(r["test_acc"]) for r in rows if r["protocol"] == "val"}
    raise SystemExit(f"{path}: expected columns method, task, seed and test_acc_val, or protocol and test_acc")


def read_ours(runs_dir: str) -> dict[tuple[str, str, int], float]:
    "This machine's test accuracy under protocol `val` per (method, task, seed), from the runs' results.json."
    return {(result["method"], run["task"], run["seed"]): run["summary"]["val"]["test_acc"]
            for path in sorted(Path(runs_dir).glob("*/results.json")) for result in [json.loads(path.read_text())]
            for run in result["runs"]}


def task_means(diffs: dict, method: str, tasks: list[str]) -> list[float]:
    "Per task, the mean over seeds of one method's differences."
    return [statistics.fmean(d for (m, t, _), d in diffs.items() if m == method and t == task) for task in tasks]


def main(runs_dir: str, other_csv: str) -> None:
    other, ours = read_other(other_csv), read_ours(runs_dir)
    shared = sorted(set(other) & set(ours))
    if not shared: raise SystemExit(f"no (method, task, seed) run is in both {runs_dir} and {other_csv}")
    diffs = {key: 100 * (other[key] - ours[key]) for key in shared}
    identical = sum(abs(d) < 1e-9 for d in diffs.values())
    tasks = list(dict.fromkeys(task for _, task, _ in shared))
    methods = sorted({m for m, _, _ in shared})
    print(f"# Cross-machine differences: {runs_dir} against {other_csv}\n")
    print(f"{len(shared)} runs on both machines; {identical} identical; the largest difference of one run "
          f"{max(map(abs, diffs.values())):.1f} points (test accuracy, protocol `val`; other machine minus this one).\n")
    print("| method | " + " | ".join(tasks) + " | mean |")
    print("|---|" + "---|" * (len(tasks) + 1))
    means = {}
    for method in methods:
        cells = task_means(diffs, method, tasks)
        means[method] = statistics.fmean(cells)
        print(f"| {method} | " + " | ".join(f"{c:+.2f}" for c in cells) + f" | {means[method]:+.2f} |")
    print(f"\nLargest difference of a method's mean over tasks: {max(map(abs, means.values())):.2f} points.\n")
    shifts = {(a, b): means[a] - means[b] for a, b in itertools.combinations(methods, 2)}
    (a, b), worst = max(shifts.items(), key=lambda item: abs(item[1]))
    print(f"Largest move of a paired difference (method minus method, mean over tasks) between the machines: "
          f"{abs(worst):.2f} points ({a} against {b}; {len(shifts)} pairs).")


if __name__ == "__main__":
    if len(sys.argv) != 3: raise SystemExit(__doc__)
    main(*sys.argv[1:3])
