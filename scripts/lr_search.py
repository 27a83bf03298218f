"""Learning rates chosen on val200 with one budget per method: every method at the same grid, on every task of the default.

    python scripts/lr_search.py OUT [--methods lora,adapter,coeff,moppa] [--lrs 0.001,0.003,0.01] [--seeds 0]

Trains each method at each learning rate of the grid with the default profile's recipe otherwise (`params.yaml`: train,
method_train, task_train; only the method's `lr` replaced), on the data and backbone that `dvc repro` prepared
(artifacts/default/...). For each method and task group the learning rate with the best val200 accuracy (the epoch val200
selects, mean over the group's tasks and the seeds) is chosen; test accuracy is printed beside it and never selects.
Writes OUT/lr_search.csv (method, lr, task, group, seed, val, test) and OUT/lr_selected.csv (method, group, the selected
lr, its val and test, and the lr params.yaml uses), and prints both as Markdown. Runs are read back when OUT holds them.
"""
import argparse
import copy
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd   # noqa: E402

from moppa_nb.runner import run_method   # noqa: E402
from moppa_nb.settings import experiment_settings, load_params, run_settings   # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the runs and the two CSV files")
    parser.add_argument("--methods", default="lora,adapter,coeff,moppa", help="comma-separated method specs")
    parser.add_argument("--lrs", default="0.001,0.003,0.01", help="comma-separated learning rates, the same for every method")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: as the pipeline chooses)")
    args = parser.parse_args(argv)
    params = load_params()
    profile = params["profiles"]["default"]
    if not (Path(profile["backbone"]["path"]) / "backbone.json").exists() or not Path(profile["data"]["root"]).is_dir():
        parser.error("the default's data or backbone is missing: run `dvc repro prepare backbone` first")
    profile["seeds"] = [int(seed) for seed in args.seeds.split(",")]
    lrs, methods = [float(lr) for lr in args.lrs.split(",")], args.methods.split(",")
    vtab = experiment_settings(params, "default", "vtab")     # the main table's settings: the rate it uses per (method, task)
    rows = []
    for method in methods:
        for lr in lrs:
            trial = copy.deepcopy(params)
            trial["profiles"]["default"].setdefault("method_train", {}).setdefault(method, {})["lr"] = lr
            results = run_method(method, trial, args.out / "runs" / method / f"lr{lr:g}", profile="default", jobs=args.jobs)
            rows += [{"method": method, "lr": lr, "task": run["task"], "group": run["group"], "seed": run["seed"],
                      "val": 100 * run["summary"]["val"]["val_acc"], "test": 100 * run["summary"]["val"]["test_acc"],
                      "params_lr": run_settings(vtab, method, run["task"])["lr"]}
                     for run in results["runs"]]
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "lr_search.csv", index=False)
    by_group = table.groupby(["method", "group", "lr"], sort=False)[["val", "test"]].mean().reset_index()
    chosen = by_group.loc[by_group.groupby(["method", "group"], sort=False).val.idxmax()]
    in_use = table.groupby(["method", "group"], sort=False).params_lr.first()
    chosen = chosen.assign(params_lr=[in_use[m, g] for m, g in zip(chosen.method, chosen.group)]).rename(columns={"lr": "selected_lr"})
    chosen = chosen.round({"val": 2, "test": 2})                      # learning rates as they are
    chosen.to_csv(args.out / "lr_selected.csv", index=False)
    print(by_group.pivot_table(index=["method", "lr"], columns="group", values="val", sort=False).round(1).to_markdown())
    print()
    print(chosen.to_markdown(index=False, floatfmt="g"))


if __name__ == "__main__":
    main()
