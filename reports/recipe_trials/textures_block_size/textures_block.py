"""One-off: headroom_scan on textures with BLOCK px blocks (default 64) instead of the module's, and how val200 tracks test."""
import sys, importlib.util, json
from pathlib import Path
def main():
    import moppa_nb.mini_vtab as mv
    block, out = int(sys.argv[1]), sys.argv[2]
    mv.BLOCK = block
    spec = importlib.util.spec_from_file_location("hs", "scripts/headroom_scan.py"); hs = importlib.util.module_from_spec(spec); spec.loader.exec_module(hs)
    hs.main([out, "--tasks", "textures", "--seeds", "0,1,2"])
    import pandas as pd
    for method in ("linear", "full"):
        for run in json.loads((Path(out) / "runs" / method / "results.json").read_text())["runs"]:
            h = pd.DataFrame(run["history"])
            print(method, run["seed"], "rho", round(h.val_acc.corr(h.test_acc, method="spearman"), 2),
                  "sel", int(h.val_acc.values.argmax()) + 1, "of", len(h), "test@sel", round(100 * h.test_acc.values[h.val_acc.values.argmax()], 1),
                  "final", round(100 * h.test_acc.values[-1], 1))


if __name__ == "__main__":
    main()
