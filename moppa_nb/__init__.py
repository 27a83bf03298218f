"""moppa-nb: MoPPA, Coeff-Tuning and PEFT baselines for timm vision transformers.

Importing the package registers every built-in method. This file is written by hand (nbdev only
updates `__version__`); every other module is exported from `nbs/`.
"""
__version__ = "0.1.0"

from moppa_nb.registry import PeftError, PeftMethod, ViTLayout, get_method, list_methods, register_method, vit_layout
from moppa_nb import moppa as _moppa  # noqa: F401  (registers "moppa")
from moppa_nb import coeff as _coeff  # noqa: F401  (registers "coeff")
from moppa_nb import weight_space as _weight_space  # noqa: F401  (registers "linear", "full", "bitfit", "lora", "nola", "ssf", "fact")
from moppa_nb import added_modules as _added_modules  # noqa: F401  (registers "vpt", "adapter", "adaptformer")
from moppa_nb import more_baselines as _more_baselines  # noqa: F401  (registers "rlrr", "dora", "bi_adapter", "bi_lora", "spt")
from moppa_nb.adapt import (adapted_methods, apply_peft, count_trainable, load_adapter, merge_peft, save_adapter)
from moppa_nb.moppa import route_regularisation, route_weights
from moppa_nb.train import PROTOCOLS, TrainConfig, evaluate, fit
from moppa_nb.checkpoint import CheckpointError
from moppa_nb.data import (VTAB_GROUPS, VTAB_TASKS, Preprocessing, TaskData, canonical_task, load_fgvc_task, load_vtab_task,
                           write_vtab_task)
