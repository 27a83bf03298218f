"""A recipe trial, not part of the pipeline: `scripts/headroom_scan.py` on `textures` built from BLOCK-px blocks
(`moppa_nb.mini_vtab.BLOCK` is 64), seeds 0-2, then per run how val200 tracks test over the epochs.

    python reports/recipe_trials/textures_block_size/textures_block.py BLOCK OUT     # from the repository's root
"""
import importlib.util
import json
import sys
from pathlib import Path


def main() -> None:
    import pandas as pd

    import moppa_nb.mini_vtab as mini_vtab
    block, out = int(sys.argv[1]), sys.argv[2]
    mini_vtab.BLOCK = block                         # read by textures_splits when headroom_scan builds the task
    spec = importlib.util.spec_from_file_location("headroom_scan", "scripts/headroom_scan.py")
    headroom_scan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headroom_scan)
    headroom_scan.main([out, "--tasks", "textures", "--seeds", "0,1,2"])
    for method in ("linear", "full"):
        for run in json.loads((Path(out) / "runs" / method / "results.json").read_text())["runs"]:
            history = pd.DataFrame(run["history"])
            selected = int(history.val_acc.values.argmax())          # the earliest best epoch, as protocol `val`
            print(method, run["seed"], "rho", round(history.val_acc.corr(history.test_acc, method="spearman"), 2),
                  "sel", selected + 1, "of", len(history), "test@sel", round(100 * history.test_acc.values[selected], 1),
                  "final", round(100 * history.test_acc.values[-1], 1))


if __name__ == "__main__":       # the runner's worker processes import this module: train only in the parent
    main()
