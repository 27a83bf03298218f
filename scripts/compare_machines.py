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
import itertools
import sys
from pathlib import Path

import pandas as pd

from moppa_nb.report import load_results


def read_other(path: str) -> pd.Series:
    "The other machine's test accuracy under protocol `val`, indexed by (method, task, seed)."
    rows = pd.read_csv(path)
    if "test_acc_val" in rows:
        rows = rows.rename(columns={"test_acc_val": "test_acc"})
    elif {"protocol", "test_acc"} <= set(rows):
        rows = rows[rows.protocol == "val"]
    else:
        raise SystemExit(f"{path}: expected columns method, task, seed and test_acc_val, or protocol and test_acc")
    return rows.set_index(["method", "task", "seed"]).test_acc


def read_ours(runs_dir: str) -> pd.Series:
    "This machine's test accuracy under protocol `val`, indexed by (method, task, seed), from the runs' results.json."
    long = load_results(sorted(Path(runs_dir).glob("*/results.json")))
    return long[long.protocol == "val"].set_index(["method", "task", "seed"]).test_acc


def main(runs_dir: str, other_csv: str) -> None:
    diffs = (100 * (read_other(other_csv) - read_ours(runs_dir))).dropna()     # other machine minus this one, shared runs
    if diffs.empty: raise SystemExit(f"no (method, task, seed) run is in both {runs_dir} and {other_csv}")
    cells = diffs.groupby(["method", "task"]).mean().unstack("task")          # per method and task: the seed mean
    means = cells.mean(axis=1)
    print(f"# Cross-machine differences: {runs_dir} against {other_csv}\n")
    print(f"{len(diffs)} runs on both machines; {int((diffs.abs() < 1e-9).sum())} identical; the largest difference of one run "
          f"{diffs.abs().max():.1f} points (test accuracy, protocol `val`; other machine minus this one).\n")
    print("| method | " + " | ".join(cells.columns) + " | mean |")
    print("|---|" + "---|" * (len(cells.columns) + 1))
    for method, row in cells.iterrows():
        print(f"| {method} | " + " | ".join(f"{c:+.2f}" for c in row) + f" | {means[method]:+.2f} |")
    print(f"\nLargest difference of a method's mean over tasks: {means.abs().max():.2f} points.\n")
    shifts = {(a, b): means[a] - means[b] for a, b in itertools.combinations(means.index, 2)}
    (a, b), worst = max(shifts.items(), key=lambda item: abs(item[1]))
    print(f"Largest move of a paired difference (method minus method, mean over tasks) between the machines: "
          f"{abs(worst):.2f} points ({a} against {b}; {len(shifts)} pairs).")


if __name__ == "__main__":
    if len(sys.argv) != 3: raise SystemExit(__doc__)
    main(*sys.argv[1:3])
