"""scripts/compare_machines.py: the cross-machine differences behind `claims.cross_machine_tolerance`."""
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _runs(folder: Path, accuracies: dict[str, dict[tuple[str, int], float]]) -> Path:
    for method, runs in accuracies.items():
        (folder / method).mkdir(parents=True)
        (folder / method / "results.json").write_text(json.dumps({"method": method, "runs": [
            {"task": task, "group": "G", "seed": seed, "summary": {"val": {"test_acc": acc}}}
            for (task, seed), acc in runs.items()], "trainable_params": 0}))
    return folder


def _compare(runs: Path, other: Path) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "scripts/compare_machines.py"), str(runs), str(other)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_shift_shared_by_both_methods_does_not_move_their_comparison(tmp_path):
    ours = {"a": {("t1", 0): 0.50, ("t2", 0): 0.60}, "b": {("t1", 0): 0.40, ("t2", 0): 0.50}}
    runs = _runs(tmp_path / "runs", ours)
    other = tmp_path / "results.csv"                       # a report's results.csv: only its `val` rows count
    with open(other, "w", newline="") as f:
        writer = csv.writer(f); writer.writerow(["method", "task", "group", "seed", "protocol", "test_acc"])
        for method, shift in (("a", 0.02), ("b", 0.02)):
            for (task, seed), acc in ours[method].items():
                writer.writerow([method, task, "G", seed, "val", acc + shift])
                writer.writerow([method, task, "G", seed, "final", 0.0])
    text = _compare(runs, other)
    assert "4 runs on both machines; 0 identical" in text
    assert "Largest difference of a method's mean over tasks: 2.00 points" in text
    assert "Largest move of a paired difference (method minus method, mean over tasks) between the machines: 0.00" in text


def test_opposite_shifts_add_up_in_the_pair(tmp_path):
    ours = {"a": {("t1", 0): 0.50}, "b": {("t1", 0): 0.40}}
    other = tmp_path / "other.csv"
    other.write_text("method,task,seed,test_acc_val\na,t1,0,0.51\nb,t1,0,0.39\n")
    text = _compare(_runs(tmp_path / "runs", ours), other)
    assert "Largest difference of a method's mean over tasks: 1.00 points" in text
    assert "between the machines: 2.00 points (a against b; 1 pairs)" in text
