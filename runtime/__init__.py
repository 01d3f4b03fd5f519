"""diptych: a local LLM runtime. `diptych.load(path)` returns a Model."""

from .api import Model, load
from .errors import (ContextOverflowError, DatasetError, DiptychError, GenerationSuperseded,
                     HubError, IncompatibleDraftError, InvalidArgumentError,
                     MissingDependencyError, ModelFileError, NumericalError, OutOfMemoryError,
                     SamplingError, UnsupportedModelError)
from .inference.sampling import SamplingParams
from .sources.quantize import quantize
from .training.finetune import finetune
from .training.fuse import fuse

__version__ = "0.1.0"

__all__ = ["load", "quantize", "finetune", "fuse", "Model", "SamplingParams", "DiptychError",
           "ModelFileError", "UnsupportedModelError", "SamplingError", "InvalidArgumentError",
           "ContextOverflowError", "OutOfMemoryError", "NumericalError", "GenerationSuperseded",
           "IncompatibleDraftError", "HubError", "DatasetError", "MissingDependencyError"]
