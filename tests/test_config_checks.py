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
