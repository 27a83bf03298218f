"""The default profile trains every compared method with the learning rate its val200 search selected.

The search is `scripts/lr_search.py` (its rows committed in reports/lr_search/default/lr_search.csv); `params.yaml`
carries the selection in `task_train`. A changed rate in params.yaml without a new search fails here.
"""
import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from moppa_nb.report import lr_selection_table
from moppa_nb.settings import experiment_methods, experiment_settings, load_params

ROOT = Path(__file__).resolve().parents[1]
SEARCH = ROOT / "reports" / "lr_search" / "default" / "lr_search.csv"
REFERENCE = {"full"}      # the headroom reference keeps the papers' fine-tuning rate (params.yaml), not searched


@pytest.fixture(scope="module")
def search_and_main_table():
    params = load_params(ROOT / "params.yaml")
    return pd.read_csv(SEARCH), experiment_settings(params, "default", "vtab")


def _lr_search_script():
    spec = importlib.util.spec_from_file_location("lr_search", ROOT / "scripts" / "lr_search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_search_covers_every_method_task_and_rate(search_and_main_table):
    search, vtab = search_and_main_table
    methods = [m for m in experiment_methods(vtab) if m not in REFERENCE]
    assert sorted(set(search.method)) == sorted(methods)
    grid = search.groupby(["method", "task"]).lr.apply(frozenset)
    assert set(grid.index) == {(m, t) for m in methods for t in vtab["tasks"]}
    assert grid.groupby("method").nunique().eq(1).all(), "a method's grid is the same on every task"
    assert len(frozenset.intersection(*grid)) >= 4, "one grid of at least 4 rates shared by every method"
    assert search.groupby(["method", "lr", "task"]).seed.nunique().nunique() == 1, "the same seeds everywhere"


def test_no_selection_sits_at_an_edge_the_search_did_not_look_past(search_and_main_table):
    search, _ = search_and_main_table
    script = _lr_search_script()
    for method, rows in search.groupby("method"):
        grid = sorted(rows.lr.unique())
        assert script.grid_extension(rows) == [] or len(grid) >= 6, f"{method}: its best rate is at an end of {grid}"


def test_the_grid_grows_past_an_end_that_wins():
    script = _lr_search_script()
    rows = pd.DataFrame({"group": "Natural", "lr": [0.001, 0.003, 0.01], "val": [60.0, 61.0, 62.0]})
    assert script.grid_extension(rows) == [0.03]
    assert script.grid_extension(rows.assign(val=[62.0, 61.0, 60.0])) == [0.0003]
    assert script.grid_extension(rows.assign(val=[61.0, 62.0, 62.0])) == []      # a tie at the end: no step past it
    assert [script.half_decade(lr, up=True) for lr in (0.003, 0.03)] == [0.01, 0.1]


def test_the_main_table_uses_the_selected_rates(search_and_main_table):
    search, vtab = search_and_main_table
    table = lr_selection_table(search, vtab)
    assert table.agrees.all(), "params.yaml does not train with the val200 selection:\n" + table[~table.agrees].to_string()


def _searched_settings(monkeypatch, method: str, lr: float, **options) -> tuple[dict, dict]:
    "The settings `search_runs` trains `method` with per task (training stubbed out), and vtab's own."
    from moppa_nb.settings import run_settings
    script, params = _lr_search_script(), load_params(ROOT / "params.yaml")
    seen = {}

    def fake_run_method(method, trial, output_dir, profile=None, experiment=None, jobs=None):
        settings = experiment_settings(trial, profile, experiment)
        seen.update({task: run_settings(settings, method, task) for task in settings["tasks"]})
        return {"runs": []}

    monkeypatch.setattr(script, "run_method", fake_run_method)
    script.search_runs(params, method, lr, Path("unused"), jobs=1, **options)
    vtab = experiment_settings(params, "default", "vtab")
    return seen, {task: run_settings(vtab, method, task) for task in vtab["tasks"]}


def test_the_search_trains_with_the_main_tables_recipe(monkeypatch):
    """Only the rate differs from what `vtab` trains (its epochs per task, e.g. 30 on location), for every method."""
    for method in ("linear", "adapter", "moppa"):
        searched, main_table = _searched_settings(monkeypatch, method, 0.0123)
        assert searched == {task: {**settings, "lr": 0.0123} for task, settings in main_table.items()}, method


def test_a_longer_recipe_under_test_changes_the_epochs_of_its_tasks_only(monkeypatch):
    """`--epochs location=60`: every method trains location 60 epochs, the other tasks and settings as `vtab`."""
    for method in ("adapter", "coeff"):
        searched, main_table = _searched_settings(monkeypatch, method, 0.03, epochs={"location": 60})
        assert searched == {task: {**settings, "lr": 0.03, **({"epochs": 60} if task == "location" else {})}
                            for task, settings in main_table.items()}, method


def test_the_search_refuses_unknown_tasks_and_malformed_epochs(capsys):
    script = _lr_search_script()
    for argv, error in ((["--tasks", "locaton"], "['locaton'] are not tasks"), (["--epochs", "location=0"], "'location=0' is not task=epochs"),
                        (["--tasks", "mnist", "--epochs", "location=60"], "'location=60' is not task=epochs")):
        try: script.main(argv)
        except SystemExit: pass
        else: raise AssertionError(f"{argv} was accepted")
        assert error in capsys.readouterr().err, argv
