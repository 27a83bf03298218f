"""One row per candidate scanned: headroom_scan's table, the raw-pixel probe, and how val200 follows test over full's epochs.

    python reports/recipe_trials/specialized_task/summarise.py SCANS_FOLDER > reports/recipe_trials/specialized_task/candidates.csv

SCANS_FOLDER holds one `scan_<candidate>` folder per `candidates.py` run (its data/ and runs/, as headroom_scan writes them).
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd   # noqa: E402

from moppa_nb.pretrain import linear_probe_accuracy, pixel_features   # noqa: E402
from moppa_nb.settings import load_params   # noqa: E402
from moppa_nb.sources import load_task   # noqa: E402


def main() -> None:
    rows, profile = [], load_params()["profiles"]["default"]
    for scan in sorted(p for p in Path(sys.argv[1]).glob("scan_*") if p.is_dir()):
        table = pd.read_csv(scan / "headroom.csv").iloc[0]
        task = table.task
        data = load_task(profile | {"data": profile["data"] | {"root": str(scan / "data")}}, task, splits=("train800", "val200", "test"))
        full = json.loads((scan / "runs" / "full" / "results.json").read_text())["runs"]
        rho = [pd.DataFrame(run["history"])[["val_acc", "test_acc"]].corr(method="spearman").iloc[0, 1] for run in full]
        rows.append({**table.drop("needed").to_dict(), "raw_pixel_probe": round(100 * linear_probe_accuracy(pixel_features, data)["test_acc"], 1),
                     "full_val_test_rank_corr": round(float(pd.Series(rho).median()), 2)})
    print(pd.DataFrame(rows).rename(columns={"task": "candidate"}).to_csv(index=False), end="")


if __name__ == "__main__":
    main()
