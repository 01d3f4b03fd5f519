"""Fine-tuning options: one set of names for Python keywords, CLI flags (`--learning-rate`
for `learning_rate`) and config files (YAML or TOML, a flat mapping of the same names)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from diptych.errors import InvalidArgumentError
from diptych.model.adapters import TARGETS

# "auto": bf16 where the backend multiplies bf16 natively (Backend.bf16_native), else fp32
COMPUTE_DTYPES = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrainOptions:
    """What a fine-tuning run does. `steps` (optimizer updates) wins over `epochs`; each
    update sees batch_size * grad_accumulation examples."""

    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False            # scale alpha / sqrt(rank) instead of alpha / rank
    dropout: float = 0.0            # on each pair's input, while training (PEFT's lora_dropout)
    modules: tuple[str, ...] | None = None  # None: every attention and MLP projection
    layers: tuple[int, ...] | None = None   # None: every layer
    learning_rate: float = 1e-4
    min_learning_rate: float = 0.0  # where the cosine ends
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    batch_size: int = 4
    grad_accumulation: int = 1
    max_seq_len: int = 512
    grad_checkpointing: bool = False
    # the dtype of the products with the base weights (adapters, optimizer and loss stay
    # fp32); bf16 is QLoRA's usual compute dtype
    compute_dtype: str = field(default="auto", metadata={"choices": COMPUTE_DTYPES})
    seed: int = 0
    steps: int | None = None
    epochs: float | None = None
    eval_every: int = 0             # validation loss every N steps (0: at the end only)
    save_every: int = 0             # a checkpoint every N steps (0: at the end only)

    def __post_init__(self):
        for name in ("rank", "batch_size", "grad_accumulation", "max_seq_len"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            _check_int(name, getattr(self, name), 0)
        if self.steps is not None:
            _check_int("steps", self.steps, 1)
        for name in ("alpha", "learning_rate", "min_learning_rate", "weight_decay", "adam_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InvalidArgumentError(f"{name} must be a number >= 0, got {value!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or \
                not 0 <= self.dropout < 1:
            raise InvalidArgumentError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise InvalidArgumentError(f"compute_dtype must be one of "
                                       f"{', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(
                self.epochs, (int, float)) or self.epochs <= 0):
            raise InvalidArgumentError(f"epochs must be a number > 0, got {self.epochs!r}")
        if not (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            raise InvalidArgumentError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        unknown = [m for m in self.modules or () if m not in TARGETS]
        if unknown or self.modules == ():
            raise InvalidArgumentError(f"unknown modules {unknown or '(none given)'}; choose "
                                       f"from {', '.join(TARGETS)}")
        if self.layers is not None and not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
            raise InvalidArgumentError(f"layers must be layer indices >= 0, got {self.layers!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

    @classmethod
    def from_mapping(cls, values: dict) -> TrainOptions:
        """Options from keywords or a config file; an unknown name is an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InvalidArgumentError(f"unknown fine-tuning option(s): {', '.join(unknown)}")
        values = dict(values)
        for name in ("modules", "layers", "betas"):
            if isinstance(values.get(name), str):
                values[name] = [v.strip() for v in values[name].split(",") if v.strip()]
            if isinstance(values.get(name), list):
                values[name] = tuple(int(v) if name == "layers" else
                                     float(v) if name == "betas" else v for v in values[name])
        return cls(**values)


def _check_int(name, value, least):
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidArgumentError(f"{name} must be an integer >= {least}, got {value!r}")


def read_config(path: str | Path) -> dict:
    """A YAML (.yaml, .yml) or TOML (.toml) file of options, as a mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidArgumentError(f"cannot read the config file {path}: {e}") from e
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            values = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            raise InvalidArgumentError(f"{path}: a config file is .yaml, .yml or .toml")
    except InvalidArgumentError:
        raise
    except Exception as e:  # each parser raises its own error type
        raise InvalidArgumentError(f"{path} is not valid {path.suffix[1:].upper()}: {e}") from e
    if not isinstance(values, dict):
        raise InvalidArgumentError(f"{path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in values.items()}
