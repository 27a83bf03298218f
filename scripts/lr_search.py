"""Learning rates chosen on val200 with one budget per method: every method at the same grid, on every task of the default.

    python scripts/lr_search.py [--output reports/lr_search/default] [--runs runs/lr_search/default]
        [--methods linear,lora,adapter,coeff,moppa,lora+coeff] [--lrs 0.001,0.003,0.01,0.03] [--seeds 0]
        [--tasks location] [--epochs location=60]

Trains each method at each learning rate of the grid with the main table's recipe otherwise (`params.yaml`: the default
profile's `vtab` experiment, its train, method_train, task_train; only the method's `lr` replaced, on every task), on the data and backbone that `dvc repro`
prepared (artifacts/default/...). Where a method's best rate for a group sits at an end of its grid and beats its
neighbour there, the grid grows by a half-decade step past that end (0.03 -> 0.1, 0.001 -> 0.0003), up to --max-rates
rates, so no selection is left at an edge the search never looked past; every method gets the same rule. Writes OUTPUT/lr_search.csv, one row per run (method, lr, task, group, seed, val and
test accuracy % of the epoch val200 selects, whether the run passed the report's convergence check, whether training
diverged: a non-finite loss on any task leaves the rate without a val accuracy, so it is never selected), and prints the
selection of `moppa_nb.report.lr_selection_table`: per method and task group the rate with the best val200 accuracy
(mean over the group's tasks and seeds; test never selects), beside the rate the main table (`vtab`) trains with. The
report stage shows the same section from the committed OUTPUT (`--lr-search`); `params.yaml` carries the selected
rates in `task_train` and tests/test_lr_selection.py checks that they agree. Runs are read back when RUNS holds them.
`--tasks` searches some of the tasks only and `--epochs` trains a task for that many epochs, every method alike: a
longer recipe under test, before `params.yaml` adopts it (give such a search its own --output and --runs).
"""
import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd   # noqa: E402

from moppa_nb.report import lr_selection_table, run_convergence   # noqa: E402
from moppa_nb.runner import run_method   # noqa: E402
from moppa_nb.settings import experiment_settings, load_params   # noqa: E402

EXPERIMENT = "vtab"   # the main table: its recipe (epochs, tasks) is the search's


def search_runs(params: dict, method: str, lr: float, runs: Path, jobs: int | None, epochs: dict[str, int] | None = None) -> list[dict]:
    "Train (or read back) `method` at `lr` (and `epochs` per task, where given) on every task and seed of the main table (`vtab`, default profile); one row per run."
    trial = copy.deepcopy(params)
    profile = trial["profiles"]["default"]
    merged = experiment_settings(trial, "default", EXPERIMENT).get("task_train", {}).get(method, {})
    vtab = profile["experiments"][EXPERIMENT]
    # task_train comes last in run_settings and an experiment's entry replaces the profile's: only the rate is replaced
    vtab.setdefault("task_train", {})[method] = {task: {**merged.get(task, {}), "lr": lr, **({"epochs": epochs[task]} if task in (epochs or {}) else {})}
                                                 for task in profile["tasks"]}
    try:
        results = run_method(method, trial, runs / method / f"lr{lr:g}", profile="default", experiment=EXPERIMENT, jobs=jobs)
    except FloatingPointError as error:     # a non-finite loss on some task: the rate is out for the method (no val, never selected)
        print(f"{method} at lr {lr:g} diverged: {error}", file=sys.stderr)
        return [{"method": method, "lr": lr, "task": task, "group": group, "seed": seed, "val": float("nan"), "test": float("nan"),
                 "epochs": 0, "converged": False, "diverged": True}
                for task, group in profile["tasks"].items() for seed in profile["seeds"]]
    return [{"method": method, "lr": lr, "task": run["task"], "group": run["group"], "seed": run["seed"],
             "val": round(100 * run["summary"]["val"]["val_acc"], 2), "test": round(100 * run["summary"]["val"]["test_acc"], 2),
             "epochs": len(run["history"]), "converged": run_convergence(run["history"])["converged"], "diverged": False}
            for run in results["runs"]]


def half_decade(lr: float, up: bool) -> float:
    "The next rate of the 1, 3, 10, 30, ... ladder above (or below) `lr`."
    step = 10 / 3 if f"{lr:.0e}".startswith("3") == up else 3.0
    return float(f"{(lr * step if up else lr / step):.0e}")


def grid_extension(method_rows: pd.DataFrame) -> list[float]:
    "Rates past the ends of one method's grid where a group's best mean val200 sits at that end and beats its neighbour."
    val = method_rows.groupby(["group", "lr"]).val.mean().unstack("lr").sort_index(axis=1)
    rates, wider = list(val.columns), set()
    if len(rates) < 2: return []
    for _, row in val.iterrows():
        if row.iloc[-1] == row.max() and row.iloc[-1] > row.iloc[-2]: wider.add(half_decade(rates[-1], up=True))
        if row.iloc[0] == row.max() and row.iloc[0] > row.iloc[1]: wider.add(half_decade(rates[0], up=False))
    return sorted(wider)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("reports/lr_search/default"), help="folder for lr_search.csv (committed)")
    parser.add_argument("--runs", type=Path, default=Path("runs/lr_search/default"), help="folder for the runs (checkpoints; not committed)")
    parser.add_argument("--methods", default="linear,lora,adapter,coeff,moppa,lora+coeff", help="comma-separated method specs")
    parser.add_argument("--lrs", default="0.001,0.003,0.01,0.03", help="comma-separated learning rates, the same for every method")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--max-rates", type=int, default=6, help="the most rates a method's grid may grow to")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: as the pipeline chooses)")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: every task of the default profile)")
    parser.add_argument("--epochs", default=None, help="task=epochs,...: train these tasks this many epochs, every method alike")
    args = parser.parse_args(argv)
    params = load_params()
    profile = params["profiles"]["default"]
    profile["seeds"] = [int(seed) for seed in args.seeds.split(",")]
    if args.tasks is not None:
        unknown = [task for task in args.tasks.split(",") if task not in profile["tasks"]]
        if unknown: parser.error(f"--tasks: {unknown} are not tasks of the default profile {list(profile['tasks'])}")
        profile["tasks"] = {task: group for task, group in profile["tasks"].items() if task in args.tasks.split(",")}
    epochs = {}
    for item in (args.epochs.split(",") if args.epochs else []):
        task, _, count = item.partition("=")
        if task not in profile["tasks"] or not count.isdigit() or int(count) < 1:
            parser.error(f"--epochs: {item!r} is not task=epochs for a searched task {list(profile['tasks'])}")
        epochs[task] = int(count)
    if not (Path(profile["backbone"]["path"]) / "backbone.json").exists() or not Path(profile["data"]["root"]).is_dir():
        parser.error("the default's data or backbone is missing: run `dvc repro prepare backbone` first")
    lrs, methods = [float(lr) for lr in args.lrs.split(",")], args.methods.split(",")
    rows = []
    for method in methods:
        grid = sorted(lrs)
        while True:
            for lr in grid:
                if not any(row["method"] == method and row["lr"] == lr for row in rows):
                    rows += search_runs(params, method, lr, args.runs, args.jobs, epochs)
            wider = grid_extension(pd.DataFrame([row for row in rows if row["method"] == method]))
            if not wider or len(grid) >= args.max_rates: break
            grid = sorted(grid + wider)
    table = pd.DataFrame(rows)
    args.output.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.output / "lr_search.csv", index=False)
    print(table.pivot_table(index=["method", "lr"], columns="group", values="val", sort=False).round(1).to_markdown())
    print()
    chosen = lr_selection_table(table, experiment_settings(params, "default", EXPERIMENT))
    print(chosen.round({"val": 2, "test": 2}).to_markdown(index=False, floatfmt="g"))


if __name__ == "__main__":
    main()
