"""The one family of exceptions diptych raises for bad input.

Every error a user can cause (a missing or corrupt file, an unsupported model, a bad
sampling parameter, a prompt that does not fit) is a `DiptychError`, so callers and the CLI
catch one type and show its message instead of a numpy or torch traceback.
"""


class DiptychError(Exception):
    """Base class of every error diptych raises on purpose."""


class ModelFileError(DiptychError):
    """A model file is missing, unreadable, truncated or corrupt."""


class UnsupportedModelError(DiptychError):
    """The file is valid but describes an architecture or tensor type diptych cannot run."""


class InvalidArgumentError(DiptychError, ValueError):
    """An argument (context size, backend name, message list, ...) is invalid."""


class TokenizerError(InvalidArgumentError):
    """A token id out of range, or a request the vocabulary cannot satisfy (no BOS token)."""


class SamplingError(InvalidArgumentError):
    """A sampling or generation parameter is out of range."""


class ContextOverflowError(DiptychError):
    """A prompt (plus the tokens asked for) does not fit in the context window."""


class OutOfMemoryError(DiptychError):
    """Loading the model or allocating its cache would not fit in memory."""


class BackendUnavailableError(DiptychError):
    """The requested backend is not installed or cannot run on this machine."""


class DefaultModelError(DiptychError):
    """The embedded default model could not be found, downloaded or verified."""


class GenerationInterrupted(DiptychError):
    """Generation was stopped (Ctrl+C); the model stays usable."""


class ChatTemplateError(DiptychError):
    """A chat template is malformed, raised an error, or tried to leave its sandbox."""


class GenerationSuperseded(DiptychError):
    """Another generation (or evaluation) started on the same model and took over its cache;
    this one cannot continue without giving wrong text."""


class NumericalError(DiptychError):
    """The model computed NaN or infinite values: its weights or hyper-parameters are broken."""

    @classmethod
    def logits(cls, where: str) -> "NumericalError":
        """The one wording for non-finite logits; `where` says at which position or token."""
        return cls(f"the model computed NaN or infinite logits {where}: its weights or "
                   f"settings are broken")


class HubError(ModelFileError):
    """A model named on the Hugging Face Hub (`org/repo[:QUANT]`) cannot be found, listed or
    downloaded, and is not in the cache."""


class MissingDependencyError(DiptychError):
    """A feature's optional dependencies (an extra, such as `diptych[server]`) are not
    installed."""


class DatasetError(InvalidArgumentError):
    """Training data is missing or malformed; the message names the file and line."""


class IncompatibleDraftError(InvalidArgumentError):
    """A draft model whose tokenizer differs from the target's: its tokens would not mean the
    same text."""
