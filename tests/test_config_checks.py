"""Every configuration dataclass is checked by `registry.check_fields`: one message format, the error types callers expect."""
import dataclasses
import re

import pytest

import moppa_nb.adapt  # noqa: F401  (registers every method)
from moppa_nb.data import Preprocessing
from moppa_nb.pretrain import PretrainConfig
from moppa_nb.registry import MethodOptions, PeftError, get_method, list_methods
from moppa_nb.train import TrainConfig
from moppa_nb.weight_space import LoRAOptions


@pytest.mark.parametrize("make, error, message", [
    (lambda: TrainConfig(epochs=0), ValueError, "TrainConfig.epochs must be at least 1, got 0."),
    (lambda: TrainConfig(epochs=1.5), TypeError, "TrainConfig.epochs must be int, got 1.5."),
    (lambda: TrainConfig(grad_clip=float("inf")), ValueError, "TrainConfig.grad_clip must be a finite number, got inf."),
    (lambda: TrainConfig(amp="fp32"), TypeError, "TrainConfig.amp must be one of 'auto', 'bf16', 'off', got 'fp32'."),
    (lambda: Preprocessing(size=0), ValueError, "Preprocessing.size must be at least 1, got 0."),
    (lambda: Preprocessing(interpolation="bilnear"), ValueError,
     "Preprocessing.interpolation must be one of 'bicubic', 'bilinear', got 'bilnear'. Did you mean 'bilinear'?"),
    (lambda: PretrainConfig(steps=0), ValueError, "PretrainConfig.steps must be at least 1, got 0."),
    (lambda: PretrainConfig(teacher_block=7), ValueError, "PretrainConfig.teacher_block must be in [0, 6]"),
    (lambda: PretrainConfig(seed="0"), TypeError, "PretrainConfig.seed must be int, got '0'."),
    (lambda: LoRAOptions(rank=0), PeftError, "LoRAOptions.rank must be at least 1, got 0."),
    (lambda: LoRAOptions(alpha=float("nan")), PeftError, "LoRAOptions.alpha must be a finite number, got nan."),
])
def test_configs_share_one_message_format(make, error, message):
    with pytest.raises(error, match=re.escape(message)):
        make()


def test_valid_configs_keep_their_values_and_lists_become_tuples():
    assert TrainConfig(grad_clip=1.0, num_threads=2, val_split=None).grad_clip == 1.0
    assert Preprocessing(size=28, interpolation="bilinear", normalization="half") == Preprocessing(28, "bilinear", "half")
    assert PretrainConfig(upstream_images=512, steps=10).warmup_steps == 30     # the smoke profile: warm-up longer than training
    moppa = get_method("moppa").Options(branches=["poisson", "heat"])
    assert moppa.branches == ("heat", "poisson")                                 # canonical order, a tuple
    assert get_method("rlrr").Options(targets=["fc2"]).targets == ("fc2",)


def test_every_library_method_checks_its_options_when_built():
    library = [name for name in list_methods() if get_method(name).__module__.startswith("moppa_nb.")]
    assert len(library) >= 15
    for name in library:
        options = get_method(name).Options
        assert issubclass(options, MethodOptions), f"{name}: {options.__name__} does not derive from MethodOptions"
        for field in dataclasses.fields(options):
            if "rule" in field.metadata and field.default is not None:
                assert field.metadata["rule"].test(field.default), f"{options.__name__}.{field.name}'s default breaks its rule"


def _smoke_params() -> dict:
    import copy
    from pathlib import Path
    import yaml
    return copy.deepcopy(yaml.safe_load((Path(__file__).parent.parent / "params.yaml").read_text()))


def _set(params: dict, key: str, value) -> dict:
    "`params` with `profiles.smoke.<key>` (a dotted path) set to `value`."
    node, *path = params["profiles"]["smoke"], *key.split(".")
    *parents, last = path
    for part in parents: node = node.setdefault(part, {})
    node[last] = value
    return params


@pytest.mark.parametrize("key, value, message", [
    ("method_train.lora", 5, "profiles.smoke.method_train.lora: expected a mapping of training settings, got 5"),
    ("method_train.lora", None, "profiles.smoke.method_train.lora: expected a mapping of training settings, got None"),
    ("method_options", None, "profiles.smoke.method_options: expected a mapping"),
    ("method_options.lora", 5, "profiles.smoke.method_options.lora: expected a mapping"),
    ("method_train.moppa[heat]", {"lr": 0.1}, "profiles.smoke.method_train.moppa[heat]: a variant's settings go under"),
    ("method_options.moppa[heat]", {"branches": ["heat"]}, "profiles.smoke.method_options.moppa[heat]: a variant's settings go under"),
    ("task_options.lora", {"cifar": {"rank": 4}}, "profiles.smoke.task_options.lora.cifar: unknown task"),
    ("task_options.lora", {"digits": {"rank": 0}}, "profiles.smoke.task_options.lora.digits: LoRAOptions.rank must be at least 1"),
])
def test_settings_that_would_never_be_applied_or_cannot_be_read_are_refused_naming_the_key(key, value, message):
    """Issue #27's silent-wrong and unclear cases in the settings: one line naming the key, never a raw TypeError, and no key
    accepted that no run applies (a variant's settings under method_train / method_options)."""
    from moppa_nb.settings import SettingsError, check_profile
    with pytest.raises(SettingsError, match=re.escape(message)):
        check_profile(_set(_smoke_params(), key, value), "smoke")


def test_a_composition_entry_in_another_order_than_the_runs_is_refused():
    from moppa_nb.settings import SettingsError, check_profile
    params = _set(_smoke_params(), "experiments.vtab.methods", {"ours": ["lora+coeff"]})
    _set(params, "method_options.coeff+lora", {"lora": {"rank": 4}})
    with pytest.raises(SettingsError, match=re.escape("method_options.coeff+lora: not the spec of any run, so never applied; "
                                                      "the runs' spec is 'lora+coeff'")):
        check_profile(params, "smoke")
    params["profiles"]["smoke"]["method_options"] = {"lora+coeff": {"lora": {"rank": 4}}}
    assert check_profile(params, "smoke")["name"] == "smoke"


def test_a_key_given_twice_in_params_yaml_is_refused(tmp_path):
    from moppa_nb.settings import SettingsError, load_params
    (tmp_path / "params.yaml").write_text("profile: smoke\nprofiles:\n  smoke:\n    seeds: [0]\n    seeds: [1]\n")
    with pytest.raises(SettingsError, match="line 5: key 'seeds' is given twice in one mapping"):
        load_params(tmp_path / "params.yaml")
