"""mlpspec: combined token/embedding ("MLP") speculators for lossless, faster LLM decoding."""

from .base import BaseOutput, check_pair, load_base, run_base, speculator_config_for
from .checkpoint import load_speculator
from .errors import MLPSpecError
from .model import MLPSpeculator, MLPSpeculatorConfig

__all__ = [
    "BaseOutput",
    "MLPSpecError",
    "MLPSpeculator",
    "MLPSpeculatorConfig",
    "check_pair",
    "load_base",
    "load_speculator",
    "run_base",
    "speculator_config_for",
]
