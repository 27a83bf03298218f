"""moppa-nb: MoPPA, Coeff-Tuning and PEFT baselines for timm vision transformers.

Importing the package is cheap: the names below, and the submodules, are imported on first access
(PEP 562), so `import moppa_nb.papermill_engine` (papermill's engine entry point) does not import torch.
The registry imports the built-in methods' modules before its first lookup, so `get_method`,
`list_methods` and `apply_peft` see every built-in method. This file is written by hand (nbdev only
updates `__version__`); every other module is exported from `nbs/`.
"""
__version__ = "0.1.0"

import importlib
import importlib.util

_PUBLIC = {   # name -> the submodule that defines it
    **dict.fromkeys(["PeftError", "PeftMethod", "ViTLayout", "get_method", "list_methods", "register_method", "vit_layout"],
                    "registry"),
    **dict.fromkeys(["adapted_methods", "apply_peft", "count_trainable", "load_adapter", "merge_peft", "save_adapter"], "adapt"),
    **dict.fromkeys(["route_regularisation", "route_weights"], "moppa"),
    **dict.fromkeys(["PROTOCOLS", "TrainConfig", "evaluate", "fit"], "train"),
    "CheckpointError": "checkpoint",
    **dict.fromkeys(["VTAB_GROUPS", "VTAB_TASKS", "Preprocessing", "TaskData", "canonical_task", "load_fgvc_task",
                     "load_vtab_task", "write_vtab_task"], "data"),
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    "Import a public name's submodule (or a submodule itself) on first access, then keep it as a module attribute."
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
