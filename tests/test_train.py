"""The training engine's contracts: determinism, exact resumption, NaN stop, protocols, optimiser, regularisation, errors."""
import ast
import inspect
import json
from dataclasses import replace

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import moppa_nb.moppa as moppa
import moppa_nb.train as train
from moppa_nb import apply_peft
from moppa_nb.registry import NoOptions, PeftMethod, get_method, list_methods
from moppa_nb.checkpoint import CHECKPOINT_NAME, CheckpointError, read_checkpoint
from moppa_nb.testing import toy_task, toy_vit
from moppa_nb.train import TrainConfig, evaluate, fit, make_optimizer, protocol_results

CLASSES = 3   # toy_task's default
TIMELESS = ("train_time_s", "eval_time_s", "train_images_per_s", "eval_images_per_s")


def tiny_moppa_vit(seed: int = 0, **options) -> VisionTransformer:
    vit = toy_vit(seed, drop_path_rate=0.1)   # drop path draws from the global RNG: resumption must restore it
    return apply_peft(vit, {"moppa": options})


CONFIG = TrainConfig(epochs=4, batch_size=16, lr=3e-3, warmup_epochs=1, route_reg_scale=1e-3, checkpoint_every=2,
                     device="cpu", seed=3)


def timeless(history):
    return [{k: v for k, v in record.items() if k not in TIMELESS} for record in history]


def test_same_seed_gives_identical_metrics_and_another_seed_differs(tmp_path):
    first = fit(tiny_moppa_vit(), toy_task(), CONFIG, tmp_path / "a", progress=False)
    second = fit(tiny_moppa_vit(), toy_task(), CONFIG, tmp_path / "b", progress=False)
    assert timeless(first["history"]) == timeless(second["history"])
    for name in ("history.json", "summary.json"):                  # identical runs write identical files (timings apart)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert all(first[p] == second[p] for p in ("val", "final", "best_test"))
    other = fit(tiny_moppa_vit(), toy_task(), replace(CONFIG, seed=4, epochs=2), tmp_path / "c", progress=False)
    assert other["history"][0]["train_loss"] != first["history"][0]["train_loss"]


def test_summary_and_files(tmp_path):
    summary = fit(tiny_moppa_vit(), toy_task(), replace(CONFIG, epochs=2), tmp_path, progress=False)
    assert {"val", "final", "best_test"} <= set(summary) and "unavailable" not in summary
    assert all({"epoch", "test_acc", "val_acc", "rule"} <= set(summary[p]) for p in ("val", "final", "best_test"))
    assert summary["final"]["epoch"] == 2 and summary["trainable_params"] > 0
    assert summary["images_per_s_train"] > 0 and summary["images_per_s_eval"] > 0 and summary["wall_time_s"] > 0
    timing = json.loads((tmp_path / "timing.json").read_text())           # timings live apart from the run's results
    assert timing["wall_time_s"] == summary["wall_time_s"] and [r["epoch"] for r in timing["epochs"]] == [1, 2]
    assert summary["config"]["lr"] == CONFIG.lr and summary["split_sizes"] == {"train800": 64, "val200": 32, "test": 64}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["final"] == summary["final"] and "history" not in on_disk and "wall_time_s" not in on_disk
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2] and history == timeless(summary["history"])
    assert {"lr", "train_loss", "route_reg", "val_acc", "test_acc"} <= set(history[0]) and not set(TIMELESS) & set(history[0])
    assert set(TIMELESS) <= set(summary["history"][0]) and set(TIMELESS) <= set(timing["epochs"][0])


class Interrupted(Exception):
    pass


def test_resume_after_interrupt_gives_identical_metrics(tmp_path):
    config = replace(CONFIG, epochs=5)
    whole = fit(tiny_moppa_vit(), toy_task(), config, tmp_path / "whole", progress=False)

    def kill_after_epoch_3(record):
        if record["epoch"] == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(tiny_moppa_vit(), toy_task(), config, tmp_path / "split", progress=False, on_epoch_end=kill_after_epoch_3)
    assert read_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)["epoch"] == 2       # epoch 3 was not checkpointed
    assert len(json.loads((tmp_path / "split" / "history.json").read_text())) == 3
    resumed = fit(tiny_moppa_vit(), toy_task(), config, tmp_path / "split", progress=False)
    assert resumed["resumed_from_epoch"] == 2
    assert timeless(resumed["history"]) == timeless(whole["history"])
    assert all(resumed[p] == whole[p] for p in ("val", "final", "best_test"))
    assert not list((tmp_path / "split").glob(".*.tmp"))                              # atomic writes left nothing behind
    # a finished run is not trained again: it returns its summary, with the final weights loaded
    again_model = tiny_moppa_vit()
    again = fit(again_model, toy_task(), config, tmp_path / "split", progress=False)
    assert again["resumed_from_epoch"] == 5 and again["final"] == whole["final"]
    test = toy_task().splits["test"]
    assert evaluate(again_model, *test, toy_task().preprocessing) == whole["final"]["test_acc"]


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_history(tmp_path):
    model = tiny_moppa_vit()
    calls = {"n": 0}

    def poison(module, args, output):    # training forward number 6 = epoch 2 (4 steps per epoch), step 2
        if module.training:
            calls["n"] += 1
            if calls["n"] == 6:
                return output * float("nan")
        return output

    model.head.register_forward_hook(poison)
    with pytest.raises(FloatingPointError, match=r"epoch 2, step 2 of 4") as error:
        fit(model, toy_task(), replace(CONFIG, checkpoint_every=1), tmp_path, progress=False)
    assert "history up to epoch 1 is in" in str(error.value) and "history.json" in str(error.value)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1]
    assert read_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 1


def test_protocol_selection_on_a_synthetic_history():
    history = [{"epoch": 1, "val_acc": 0.5, "test_acc": 0.55}, {"epoch": 2, "val_acc": 0.8, "test_acc": 0.60},
               {"epoch": 3, "val_acc": 0.8, "test_acc": 0.90}, {"epoch": 4, "val_acc": None, "test_acc": None},
               {"epoch": 5, "val_acc": 0.7, "test_acc": 0.70}]
    results = protocol_results(history)
    assert (results["val"]["epoch"], results["val"]["test_acc"], results["val"]["val_acc"]) == (2, 0.60, 0.8)
    assert (results["best_test"]["epoch"], results["best_test"]["test_acc"]) == (3, 0.90)
    assert (results["final"]["epoch"], results["final"]["test_acc"]) == (5, 0.70)
    assert all(results[p]["rule"] == train.PROTOCOLS[p] for p in results)
    assert set(protocol_results(history, val_held_out=False)) == {"final", "best_test"}
    with pytest.raises(ValueError, match="No evaluated epoch"):
        protocol_results([{"epoch": 1, "test_acc": None}])


def test_trainval_run_reports_no_val_protocol_and_says_why(tmp_path):
    task = toy_task()
    task.splits["train800val200"] = tuple(torch.cat(p) for p in zip(task.splits["train800"], task.splits["val200"]))
    summary = fit(tiny_moppa_vit(), task, replace(CONFIG, epochs=2, train_split="train800val200"), tmp_path, progress=False)
    assert "val" not in summary and {"final", "best_test"} <= set(summary)
    assert "part of the training split" in summary["unavailable"]["val"]
    assert "val_acc" not in summary["history"][0] and "val200" not in summary["split_sizes"]


def test_optimizer_holds_only_trainable_parameters():
    model = tiny_moppa_vit()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    optimizer = make_optimizer(model, CONFIG)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    assert len(trainable) < len(list(model.parameters()))
    groups = make_optimizer(model, replace(CONFIG, decay_1d=False)).param_groups
    assert [g["weight_decay"] for g in groups] == [CONFIG.weight_decay, 0.0]
    assert all(p.ndim <= 1 for p in groups[1]["params"]) and all(p.ndim > 1 for p in groups[0]["params"])
    frozen = tiny_moppa_vit().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(frozen, CONFIG)


@pytest.mark.parametrize("scale", [0.0, 1e-3])
def test_route_regularisation_is_added_only_when_scale_is_positive(tmp_path, monkeypatch, scale):
    calls = []
    original = moppa._route_term

    def spy(model, epoch, total_epochs, s):
        term = original(model, epoch, total_epochs, s)
        if term is not None: calls.append((epoch, total_epochs, s))
        return term

    monkeypatch.setattr(moppa, "_route_term", spy)   # MoPPA.extra_loss's term (route_regularisation's), None while off
    config = replace(CONFIG, epochs=2, route_reg_scale=scale)
    summary = fit(tiny_moppa_vit(), toy_task(), config, tmp_path, progress=False)
    if scale == 0:
        assert calls == [] and "route_reg" not in summary["history"][0]
    else:   # the bonus weight is positive in the first half of the schedule: epoch 1's 4 steps
        assert [c[0] for c in calls] == [0.0, 0.25, 0.5, 0.75] and {c[1:] for c in calls} == {(2, scale)}
        assert summary["history"][0]["route_reg"] < 0 and summary["history"][1]["route_reg"] == 0


# (train_loss, route_reg) per epoch of a 4-epoch MoPPA run at s = 0.05, recorded when `train.py` still called
# `route_regularisation` itself: moving the term into `MoPPA.extra_loss` must not change a number.
PINNED_HISTORY = [(1.0939228534698486, -0.0293058343231678), (1.0860518217086792, -0.011273158714175224),
                  (1.0501118898391724, 0.0), (1.026742696762085, 0.0)]


def test_route_regularisation_through_extra_loss_keeps_the_loss_history(tmp_path):
    summary = fit(tiny_moppa_vit(), toy_task(), replace(CONFIG, route_reg_scale=0.05, lr=1e-2), tmp_path, progress=False)
    history = [value for r in summary["history"] for value in (r["train_loss"], r["route_reg"])]
    assert history == pytest.approx([value for pair in PINNED_HISTORY for value in pair], rel=1e-6, abs=1e-7)


class _Penalty(PeftMethod):
    "A method that adds a constant to the loss: the engine must add it without knowing the method."
    name = "penalty"

    def install(self, model, layout): pass

    def extra_loss(self, model, progress):
        return torch.tensor(0.5) if progress.epoch < 1 else None


def test_the_engine_adds_any_method_s_extra_loss(tmp_path):
    model = tiny_moppa_vit()
    model.peft_methods = [*model.peft_methods, _Penalty(NoOptions())]
    summary = fit(model, toy_task(), replace(CONFIG, epochs=2, route_reg_scale=1e-3), tmp_path, progress=False)
    first, second = (r["route_reg"] for r in summary["history"])
    assert 0.5 - 1e-3 < first < 0.5 and second == 0.0     # MoPPA's small negative term plus the constant, then nothing


def test_the_training_engine_imports_no_method_module():
    imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(train))) if isinstance(node, ast.ImportFrom)}
    methods = {get_method(name).__module__.rpartition(".")[2] for name in list_methods()}
    assert methods and not {m.lstrip(".") for m in imported} & methods, imported


def test_checkpoint_of_another_config_or_model_is_refused(tmp_path):
    config = replace(CONFIG, epochs=2, checkpoint_every=1)

    def stop(record):
        raise Interrupted

    with pytest.raises(Interrupted):
        fit(tiny_moppa_vit(), toy_task(), config, tmp_path, progress=False, on_epoch_end=stop)
    with pytest.raises(CheckpointError, match="config field 'lr'"):
        fit(tiny_moppa_vit(), toy_task(), replace(config, lr=1e-2), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="adapter"):
        fit(tiny_moppa_vit(form="physical"), toy_task(), config, tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="frozen weights"):
        fit(tiny_moppa_vit(seed=1), toy_task(), config, tmp_path, progress=False)
    # runtime fields may change; resume=False starts over
    assert fit(tiny_moppa_vit(), toy_task(), replace(config, eval_batch_size=7), tmp_path, progress=False)["resumed_from_epoch"] == 1
    restarted = fit(tiny_moppa_vit(), toy_task(), replace(config, lr=1e-2), tmp_path, resume=False, progress=False)
    assert restarted["resumed_from_epoch"] == 0 and restarted["config"]["lr"] == 1e-2


def test_config_validation_names_the_field():
    for kwargs, message in [({"epochs": 0}, "TrainConfig.epochs must be at least 1, got 0."), ({"lr": "1e-3"}, "TrainConfig.lr must be float"),
                            ({"label_smoothing": 1.0}, "label_smoothing must be in [0, 1)"),
                            ({"amp": "fp16"}, "TrainConfig.amp must be one of"),
                            ({"warmup_epochs": 5, "epochs": 5}, "warmup_epochs (5) must be smaller"),
                            ({"test_split": "train800"}, "test_split"), ({"val_split": ""}, "val_split")]:
        with pytest.raises((TypeError, ValueError), match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            TrainConfig(**kwargs)


class FirstPixelClassifier(torch.nn.Module):
    """Predicts the class written in an image's first pixel."""
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), CLASSES).float() * self.scale


def test_evaluate_counts_correct_predictions_over_batches_and_restores_the_mode():
    labels = torch.arange(10) % CLASSES
    predicted = torch.where(torch.arange(10) < 7, labels, (labels + 1) % CLASSES)   # 7 of 10 right
    images = predicted[:, None, None, None].expand(10, 3, 2, 2).to(torch.uint8)
    identity = type("Identity", (), {"flip": False, "normalize": staticmethod(lambda x: x.float())})()
    model = FirstPixelClassifier()
    assert evaluate(model, images, labels, identity, batch_size=4, amp="off") == pytest.approx(0.7)
    assert model.training


def test_task_and_model_mismatches_are_clear(tmp_path):
    with pytest.raises(ValueError, match="head has 3 classes"):
        fit(tiny_moppa_vit(), replace(toy_task(), num_classes=5), CONFIG, tmp_path, progress=False)
    with pytest.raises(ValueError, match="has no split 'val200'"):
        task = toy_task()
        del task.splits["val200"]
        fit(tiny_moppa_vit(), task, CONFIG, tmp_path, progress=False)


def test_dvclive_logs_every_epoch_without_touching_dvc_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit(tiny_moppa_vit(), toy_task(), replace(CONFIG, epochs=2), tmp_path / "run", progress=False, live=tmp_path / "live")
    rows = (tmp_path / "live" / "plots" / "metrics" / "test_acc.tsv").read_text().strip().splitlines()
    assert len(rows) == 3                                                     # header + 2 epochs
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert {"val/test_acc", "final/test_acc", "best_test/test_acc"} <= set(metrics)
    assert not list(tmp_path.rglob("dvc.yaml"))


def test_compiled_training_after_another_compiled_run_in_one_process_trains_its_adapter(tmp_path):
    """`compile: true`: every run compiles from a clean dynamo cache. Without it, a LoRA model compiled after a linear one in
    the same process (a stage trains many runs) reused the first graph and its factors never moved."""
    config = replace(CONFIG, epochs=1, warmup_epochs=0, compile=True, route_reg_scale=0.0)
    fit(apply_peft(toy_vit(0), {"linear": {}}), toy_task(), config, tmp_path / "linear", progress=False)
    lora = apply_peft(toy_vit(0), {"lora": {}})
    initial = lora.blocks[0].attn.peft_lora.b.detach().clone()          # B starts at zero: it moves only with a gradient
    compiled_run = fit(lora, toy_task(), config, tmp_path / "lora", progress=False)
    assert not torch.equal(lora.blocks[0].attn.peft_lora.b, initial)
    eager_run = fit(apply_peft(toy_vit(0), {"lora": {}}), toy_task(), replace(config, compile=False), tmp_path / "eager", progress=False)
    assert compiled_run["history"][0]["train_loss"] == pytest.approx(eager_run["history"][0]["train_loss"], rel=1e-3)


def still_task():
    task = toy_task()
    task.preprocessing = replace(task.preprocessing, flip=False)
    return task


def test_a_linear_probe_trains_on_features_computed_once_with_the_same_results(tmp_path, monkeypatch):
    config = replace(CONFIG, route_reg_scale=0.0, lr=3e-2, epochs=5)
    computed = []
    record = train.head_inputs
    monkeypatch.setattr(train, "head_inputs", lambda *args, **kw: computed.append(1) or record(*args, **kw))
    cached = fit(apply_peft(toy_vit(), "linear"), still_task(), config, tmp_path / "cached", progress=False)
    assert cached["head_inputs_cached"] and len(computed) == 3          # train, val and test features: once per run
    monkeypatch.setattr(train, "only_the_head_learns", lambda model, preprocessing: False)
    whole = fit(apply_peft(toy_vit(), "linear"), still_task(), config, tmp_path / "whole", progress=False)
    assert not whole["head_inputs_cached"] and len(computed) == 3
    for a, b in zip(cached["history"], whole["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert (a["val_acc"], a["test_acc"]) == (b["val_acc"], b["test_acc"])
    assert cached["history"][-1]["train_loss"] < cached["history"][0]["train_loss"]   # it learnt something


@pytest.mark.parametrize("change", ["flips", "lora", "drop_path"])
def test_features_are_recomputed_whenever_they_could_change(tmp_path, change):
    task = toy_task() if change == "flips" else still_task()
    model = apply_peft(toy_vit(drop_path_rate=0.1 if change == "drop_path" else 0.0), "lora" if change == "lora" else "linear")
    summary = fit(model, task, replace(CONFIG, route_reg_scale=0.0, epochs=1, warmup_epochs=0), tmp_path, progress=False)
    assert not summary["head_inputs_cached"]
