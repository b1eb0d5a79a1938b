"""Training configuration: the single source of defaults, of the CLI and of input checks. The lowest floor:
nothing here imports the rest of the package, nor torch or DeepSpeed.

- settings.py: TrainConfig, every flag as a field that carries its own help text (speft_ds.cli derives the
  command line from them)
- checks.py: every check that needs no model, data or process group
- inputs.py: what flags name, read and checked (files, models, target patterns, trackers)
- constants.py: defaults and the names flags choose among
- errors.py: the two errors a user sees as one line
"""

from .constants import (CHAT_TEMPLATES, DEFAULT_LEARNING_RATES, DEFAULT_MODEL, EMBEDDED_DATASET, EMBEDDED_MODEL,
                        EMBEDDED_TASK, LOCAL_DATA_SUFFIXES, LR_SCHEDULES, METHOD_FLAGS, METRIC_NAMES, PACKAGE_DIR,
                        PYPI_PREFIX, SHIPPED_DS_CONFIG, TRACKERS, WEIGHT_FREE_METRICS)
from .errors import ConfigError, TrainingError
from .inputs import looks_like_hub_name, looks_like_local_file, read_json, target_pattern, tracker_names
from .settings import TrainConfig

__all__ = ["CHAT_TEMPLATES", "DEFAULT_LEARNING_RATES", "DEFAULT_MODEL", "EMBEDDED_DATASET", "EMBEDDED_MODEL",
           "EMBEDDED_TASK", "LOCAL_DATA_SUFFIXES", "LR_SCHEDULES", "METHOD_FLAGS", "METRIC_NAMES", "PACKAGE_DIR",
           "PYPI_PREFIX", "SHIPPED_DS_CONFIG", "TRACKERS", "WEIGHT_FREE_METRICS", "ConfigError", "TrainingError",
           "looks_like_hub_name", "looks_like_local_file", "read_json", "target_pattern", "tracker_names", "TrainConfig"]
