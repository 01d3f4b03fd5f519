"""`diptych.finetune`: a LoRA fine-tuning run from a model and data to an adapter folder.

The base model stays as its GGUF file stores it (quantized on the backend); the run's folder
receives the adapter in both forms (PEFT files and adapter.gguf) and a checkpoint to resume
from. Resuming takes the options the run was started with; only `steps` and `epochs` may
change (to train further), any other option given must match.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path

from diptych.errors import DatasetError, DiptychError, InvalidArgumentError

from . import checkpoint
from .data import Example, data_files, example, load_examples
from .loop import FinetuneResult, StepReport, Trainer
from .options import TrainOptions, read_config

log = logging.getLogger(__name__)

# a training engine's own cache is never used (training attends over each step's own keys)
_ENGINE_CTX, _ENGINE_BATCH = 16, 16


def finetune(model, train=None, valid=None, out: str | Path | None = None, *,
             test=None, resume: str | Path | None = None, config: str | Path | None = None,
             backend: str = "auto", device: str | None = None,
             progress: Callable[[StepReport], None] | None = None,
             stop: threading.Event | None = None, **options) -> FinetuneResult:
    """Train a LoRA adapter on `model` (a loaded `diptych.Model`, which then uses the
    adapter; a model path or Hub name, as `diptych.load` takes; None: the embedded default
    model) and write it to `out`.

    train / valid / test: a JSONL file, a directory with train/valid/test.jsonl (as `train`:
    its valid file is used unless `valid` is given), or a list of records ({"text"},
    {"prompt", "completion"} or {"messages"}); `test=True` takes the directory's test.jsonl.
    Test loss and perplexity are computed only when there is a test set. `resume`: a run's
    folder to continue (`out` defaults to it). `config`: a YAML or TOML file of options;
    keyword options override it. Options: see `TrainOptions` (rank, alpha, rslora, dropout,
    modules, layers, learning_rate, warmup_steps, weight_decay, batch_size,
    grad_accumulation, max_seq_len, grad_checkpointing, compute_dtype, seed, steps, epochs,
    eval_every, save_every, ...). `progress`
    receives a StepReport after each update. `stop`: set it (from any thread) to end the
    run after the current micro-batch with a checkpoint saved, as Ctrl+C does. Returns the
    losses, steps, folder and the compute dtype used; the test loss and perplexity when
    there is a test set.
    """
    given = {**(read_config(config) if config else {}), **options}
    saved = checkpoint.load(Path(resume)) if resume is not None else None
    opts = _options(given, saved)
    out = Path(out if out is not None else resume) if (out or resume) else None
    if out is None:
        raise InvalidArgumentError("finetune needs out=, the folder for the adapter")
    engine, tokenizer, loaded = _engine(model, backend, device)
    splits = _splits(train, valid, test, tokenizer)
    if opts.eval_every and not splits.get("valid"):
        log.warning("eval_every=%d, but there is no validation data (--valid or valid=, or "
                    "valid.jsonl in the data folder): only the training loss is reported",
                    opts.eval_every)
    name = getattr(loaded, "name", None) or engine.cfg.name
    if loaded is not None:  # the model's cached K/V and generation give way to training
        engine.set_adapters(lambda: None)
    trainer = Trainer(engine.backend, engine.cfg, engine.weights, splits["train"], opts, out,
                      valid=splits.get("valid"), resume=saved, base_model=name, stop=stop)
    result = trainer.run(progress)
    if splits.get("test") and not result.interrupted:
        result.test_loss = trainer.evaluate(splits["test"])
        result.test_perplexity = math.exp(result.test_loss)
    if loaded is not None:
        loaded.set_adapter(out)
    return result


def _options(given: dict, saved: checkpoint.Checkpoint | None) -> TrainOptions:
    if saved is None:
        return TrainOptions.from_mapping(given)
    base = TrainOptions.from_mapping(saved.options)
    asked = TrainOptions.from_mapping({**saved.options, **given})
    changed = [k for k in given if getattr(asked, k) != getattr(base, k)
               and k not in ("steps", "epochs", "eval_every", "save_every")]
    if changed:
        raise InvalidArgumentError(f"a resumed run keeps its options; {', '.join(changed)} "
                                   f"{'differs' if len(changed) == 1 else 'differ'} from the "
                                   f"checkpoint's")
    return asked


def _engine(model, backend, device):
    """(engine, tokenizer, the Model or None) for a Model or a model path."""
    if hasattr(model, "engine") and hasattr(model, "tokenizer"):
        return model.engine, model.tokenizer, model
    from diptych.load_plan import LoadPlan

    plan = LoadPlan.open(model, backend, device=device, n_ctx=_ENGINE_CTX,
                         n_batch=_ENGINE_BATCH)
    return plan.engine(), plan.tokenizer(), None


def _splits(train, valid, test, tokenizer) -> dict[str, list[Example]]:
    if train is None:
        raise InvalidArgumentError("finetune needs train=, the training data")
    out, files = {}, {}
    if isinstance(train, (str, Path)):
        files = data_files(train)
        out = {split: load_examples(path, tokenizer) for split, path in files.items()
               if split != "test"}
    else:
        out["train"] = _records(train, tokenizer)
    if test is True:
        if "test" not in files:
            raise DatasetError("test=True needs a data directory with test.jsonl")
        test = files["test"]
    for split, given in (("valid", valid), ("test", test)):
        if given is not None:
            out[split] = load_examples(given, tokenizer) if isinstance(given, (str, Path)) \
                else _records(given, tokenizer)
    return out


def _records(records, tokenizer) -> list[Example]:
    out = []
    for n, record in enumerate(records):
        try:
            out.append(example(record, tokenizer))
        except DiptychError as e:
            raise DatasetError(f"record {n}: {e}") from None
    if not out:
        raise DatasetError("no training records given")
    return out
