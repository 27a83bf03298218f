"""headroom_scan on a candidate task registered into MINI_TASKS: python scan.py NAME OUT SEEDS [JOBS] (from the repository root)
import sys, importlib.util, json
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
def main():
    import moppa_nb.mini_vtab as mv
    from cands import CANDIDATES
    name, out, seeds = sys.argv[1:4]
    draw, k = CANDIDATES[name]
    mv.MINI_TASKS[name] = mv.MiniTask("Specialized", k, "candidate " + name, mv._drawn(draw))
    spec = importlib.util.spec_from_file_location("hs", "scripts/headroom_scan.py"); hs = importlib.util.module_from_spec(spec); spec.loader.exec_module(hs)
    hs.main([out, "--tasks", name, "--seeds", seeds, "--jobs", sys.argv[4] if len(sys.argv) > 4 else "1"])
    import pandas as pd
    from pathlib import Path
    for method in ("linear", "full"):
        for run in json.loads((Path(out) / "runs" / method / "results.json").read_text())["runs"]:
            h = pd.DataFrame(run["history"])
            print(method, run["seed"], "rho", round(h.val_acc.corr(h.test_acc, method="spearman"), 2),
                  "sel", int(h.val_acc.values.argmax()) + 1, "of", len(h), "test@sel", round(100 * h.test_acc.values[h.val_acc.values.argmax()], 1),
                  "final", round(100 * h.test_acc.values[-1], 1), "val_final", round(100 * h.val_acc.values[-1], 1))
if __name__ == "__main__":
    main()
