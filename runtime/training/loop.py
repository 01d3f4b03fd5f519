"""The training loop, written once for every backend: data order, batches and masks, the
loss, gradient accumulation, the schedule, validation, checkpoints and Ctrl+C.

The backend supplies mechanism only: `value_and_grad` of the loss closure over the adapter
arrays, `adamw`, `checkpoint` (gradient checkpointing) and `tensor`. The base model's
matrices stay as the backend prepared them (quantized); only the pairs get gradients.

Order: the examples are read in epochs, each a permutation drawn from (seed, epoch); update
u takes micro-batches u * grad_accumulation ... of batch_size consecutive examples of that
stream (an epoch's end runs on into the next). So the data position is the update count,
and a resumed run sees exactly what an uninterrupted one would.

Loss: the mean, over every masked target token of the update's micro-batches, of the
negative log-likelihood of that token given the ones before it (each micro-batch's sum is
divided by the update's whole count, so accumulation gives the same gradient as one batch).
Sequences are cut to max_seq_len tokens and padded on the right (causal attention: padding
changes nothing before it).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diptych.errors import InvalidArgumentError
from diptych.model.adapter_files import LoraAdapter, write_adapter
from diptych.model.adapters import graph_rows
from diptych.model.graph import forward_all

from . import allocator, checkpoint
from .data import Example
from .lora import attach, choose_targets, dropout_seeds, initial_pairs
from .options import TrainOptions
from .schedule import learning_rate

# fp32 logits one piece of the output head and loss holds (positions of every row of a
# batch), and the fewest positions a piece has however large the vocabulary: the head's
# product runs at a third of its speed or less below about 256 rows (BENCHMARKS.md)
HEAD_BYTES = 64 << 20
HEAD_MIN_ROWS = 256


def head_piece(vocab: int, rows: int) -> int:
    """Positions of each of `rows` rows that one piece of the head and loss takes."""
    return max(1, max(HEAD_MIN_ROWS, HEAD_BYTES // (4 * vocab)) // rows)


@dataclass
class StepReport:
    """What a progress callback sees after each update."""

    step: int
    total: int
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float
    valid_loss: float | None = None


@dataclass
class FinetuneResult:
    out: Path
    steps: int
    train_loss: float | None
    valid_loss: float | None = None
    test_loss: float | None = None
    test_perplexity: float | None = None
    interrupted: bool = False
    compute_dtype: str = "fp32"   # what TrainOptions.compute_dtype resolved to
    history: dict = field(default_factory=dict, repr=False)


class _Batch:
    """Micro-batch arrays on the device: inputs, targets and the targets' float mask, each
    (B, T-1); `count` masked targets and `tokens` real input tokens."""

    def __init__(self, be, examples: list[Example], max_len: int):
        rows = [(e.ids[:max_len], e.mask[:max_len]) for e in examples]
        width = max(len(ids) for ids, _ in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.float32)
        for r, (i, m) in enumerate(rows):
            ids[r, :len(i)], mask[r, :len(m)] = i, m
        self.shape = (len(rows), width - 1)
        self.inputs = be.ids(ids[:, :-1])
        self.targets = be.ids(ids[:, 1:])
        self.weights = be.tensor(mask[:, 1:])
        self.count = int(mask[:, 1:].sum())
        self.tokens = sum(len(i) - 1 for i, _ in rows)


class Trainer:
    """One fine-tuning run of `weights` (a loaded model's, on `backend`) on `train`."""

    def __init__(self, backend, cfg, weights, train: list[Example], options: TrainOptions,
                 out: str | Path, valid: list[Example] | None = None,
                 resume: checkpoint.Checkpoint | None = None, base_model: str | None = None,
                 stop: threading.Event | None = None):
        """`stop`: an Event that, once set, ends the run as `stop()` does."""
        if not train:
            raise InvalidArgumentError("no training examples")
        self.be, self.cfg, self.weights = backend, cfg, weights
        self.train, self.valid, self.options = train, valid or [], options
        self.out, self.base_model = Path(out), base_model
        o = options
        per_update = o.batch_size * o.grad_accumulation
        self.total = o.steps or max(1, math.ceil((o.epochs or 1) * len(train) / per_update))
        self._orders: dict[int, np.ndarray] = {}
        if resume is None:
            self.keys = choose_targets(cfg, weights, o.modules, o.layers)
            host = initial_pairs(cfg, self.keys, o.rank, o.seed)
            self.step, self.history = 0, {"train": [], "valid": []}
            self.params = [backend.tensor(p) for p in host]
            self.moments = [(backend.tensor(np.zeros_like(p)), backend.tensor(np.zeros_like(p)))
                            for p in host]
        else:
            if resume.step > self.total:   # refused before the checkpoint is rewritten
                raise InvalidArgumentError(
                    f"the checkpoint is at step {resume.step}, past the {self.total} steps "
                    f"asked for: give more steps (or epochs) to train further")
            self.keys, self.step, self.history = resume.keys, resume.step, resume.history
            self.params = [backend.tensor(p) for p in resume.params]
            self.moments = [(backend.tensor(m), backend.tensor(v)) for m, v in resume.moments]
        self._stop = stop if stop is not None else threading.Event()
        self.compute_dtype = o.compute_dtype if o.compute_dtype != "auto" else (
            "bf16" if backend.bf16_native() else "fp32")
        backend.training_products(self.compute_dtype)  # a backend without it says so now

    @property
    def activation_bytes(self) -> int:
        """Bytes of one (tokens, d_model) fp32 array of a whole micro-batch (what the
        allocator's setting is sized by)."""
        o = self.options
        return o.batch_size * o.max_seq_len * self.cfg.d_model * 4

    # -- data ------------------------------------------------------------------------------
    def _example(self, position: int) -> Example:
        epoch, j = divmod(position, len(self.train))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.options.seed, epoch])
                            .permutation(len(self.train))}
        return self.train[self._orders[epoch][j]]

    def _micro_batches(self, update: int) -> list[_Batch]:
        o = self.options
        first = update * o.grad_accumulation * o.batch_size
        return [_Batch(self.be, [self._example(first + k * o.batch_size + j)
                                 for j in range(o.batch_size)], o.max_seq_len)
                for k in range(o.grad_accumulation)]

    # -- loss ------------------------------------------------------------------------------
    def _loss(self, params, batch: _Batch, denominator: float, seeds: list[int] | None = None):
        """The summed masked negative log-likelihood of `batch` over `denominator`; with
        `seeds` (training), the pairs' inputs go through dropout with those masks.

        The output head and the loss run over pieces of about HEAD_BYTES of logits
        (`Backend.token_log_likelihood`); with gradient checkpointing none of a piece's
        logits is kept for the backward pass."""
        be, cfg, o = self.be, self.cfg, self.options
        attach(cfg, self.weights, self.keys, params, o.scale, o.dropout, seeds)
        h = forward_all(be, cfg, self.weights, batch.inputs, recompute=o.grad_checkpointing,
                        hidden_only=True)
        # the layers' transient blocks left holes in the heap between the inputs kept for
        # the backward pass: their pages go back before the head's pieces add theirs
        allocator.trim()
        rows, width = batch.shape
        step = head_piece(cfg.vocab_size, rows)
        total = None
        for a in range(0, width, step):
            b = min(width, a + step)
            part = be.token_log_likelihood(
                h[:, a:b].reshape(rows * (b - a), h.shape[-1]), self.weights.output,
                batch.targets[:, a:b].reshape(-1), batch.weights[:, a:b].reshape(-1),
                cfg.final_softcap, recompute=o.grad_checkpointing)
            total = part if total is None else total + part
        return total * (-1.0 / denominator)

    def evaluate(self, examples: list[Example]) -> float:
        """Mean loss per masked token over `examples`, with the current adapter."""
        total, count = 0.0, 0
        with self.be.inference(), self.be.training_products(self.compute_dtype):
            for k in range(0, len(examples), self.options.batch_size):
                batch = _Batch(self.be, examples[k:k + self.options.batch_size],
                               self.options.max_seq_len)
                if batch.count:
                    total += float(self._loss(self.params, batch, 1.0))
                    count += batch.count
        if not count:
            raise InvalidArgumentError("the evaluation examples have no token to predict")
        return total / count

    # -- the loop --------------------------------------------------------------------------
    def gradients(self, update: int) -> tuple[float, list, int] | None:
        """The loss of update `update`'s micro-batches, its gradient in each adapter array
        (accumulated) and the tokens seen; None when Ctrl+C came first."""
        batches = self._micro_batches(update)
        denominator = max(1, sum(b.count for b in batches))
        loss, grads = 0.0, None
        for k, batch in enumerate(batches):
            seeds = dropout_seeds(self.options.seed, update, k, len(self.keys)) \
                if self.options.dropout else None
            with self.be.training_products(self.compute_dtype):
                value, g = self.be.value_and_grad(
                    lambda p: self._loss(p, batch, denominator, seeds), self.params)
            loss += value
            grads = g if grads is None else [x + y for x, y in zip(grads, g)]
            if self._stop.is_set():
                return None
        return loss, grads, sum(b.tokens for b in batches)

    def _update(self) -> tuple[float, int] | None:
        """One optimizer update; None when Ctrl+C came before it finished (nothing changed)."""
        o = self.options
        result = self.gradients(self.step)
        if result is None:
            return None
        loss, grads, tokens = result
        lr = learning_rate(self.step, self.total, o.learning_rate, o.warmup_steps,
                           o.min_learning_rate)
        self.params, self.moments = self.be.adamw(self.params, grads, self.moments,
                                                  self.step + 1, lr, o.betas, o.adam_eps,
                                                  o.weight_decay)
        return loss, tokens

    def run(self, on_step: Callable[[StepReport], None] | None = None) -> FinetuneResult:
        """Train to the last update (or Ctrl+C), checkpointing as the options ask; the
        adapter and a checkpoint are saved at the end either way. Sets the C allocator to
        hand freed memory back (`allocator`: process-wide, and it stays so)."""
        o = self.options
        allocator.hand_back_freed_memory(self.activation_bytes)
        started, tokens, done_here = time.monotonic(), 0, 0
        interrupted = False
        with self._sigint():
            while self.step < self.total:
                result = None if self._stop.is_set() else self._update()
                if result is None:
                    interrupted = True
                    break
                loss, n = result
                allocator.trim()
                self.step += 1
                done_here, tokens = done_here + 1, tokens + n
                self.history["train"].append(loss)
                valid = None
                if self.valid and o.eval_every and self.step % o.eval_every == 0:
                    valid = self.evaluate(self.valid)
                    self.history["valid"].append([self.step, valid])
                if o.save_every and self.step % o.save_every == 0 and self.step < self.total:
                    self.save()
                if on_step:
                    elapsed = time.monotonic() - started
                    on_step(StepReport(self.step, self.total, loss, learning_rate(
                        self.step - 1, self.total, o.learning_rate, o.warmup_steps,
                        o.min_learning_rate), tokens / elapsed,
                        elapsed / done_here * (self.total - self.step), valid))
        if not interrupted and self.valid and (
                not self.history["valid"] or self.history["valid"][-1][0] != self.step):
            self.history["valid"].append([self.step, self.evaluate(self.valid)])
        self.save()
        return FinetuneResult(
            self.out, self.step, self.history["train"][-1] if self.history["train"] else None,
            self.history["valid"][-1][1] if self.history["valid"] else None,
            interrupted=interrupted, compute_dtype=self.compute_dtype, history=self.history)

    def stop(self) -> None:
        """Ask `run` to stop after the current micro-batch and save (what Ctrl+C does; safe
        from another thread)."""
        self._stop.set()

    def save(self) -> None:
        """The checkpoint and both adapter files, in the run's folder."""
        to_np = self.be.to_numpy
        params = [to_np(p) for p in self.params]
        checkpoint.save(self.out, checkpoint.Checkpoint(
            dataclasses.asdict(self.options), self.keys, self.step, params,
            [(to_np(m), to_np(v)) for m, v in self.moments], self.history))
        write_adapter(self._adapter(params), self.cfg, self.out)

    def adapter(self) -> LoraAdapter:
        """The adapter as trained so far, on the host."""
        return self._adapter([self.be.to_numpy(p) for p in self.params])

    def _adapter(self, params: list[np.ndarray]) -> LoraAdapter:
        """The pairs as adapter files hold them: B's rows back in Hugging Face order."""
        o = self.options
        pairs = {}
        for k, (i, module) in enumerate(self.keys):
            b, order = params[2 * k + 1], graph_rows(self.cfg, module)
            pairs[i, module] = (params[2 * k], b if order is None else b[np.argsort(order)])
        return LoraAdapter(pairs, o.alpha, o.rank, o.rslora, self.base_model)

    def _sigint(self):
        """While training, the first Ctrl+C asks the loop to stop after the current
        micro-batch (a second one interrupts at once); off the main thread, nothing."""
        trainer = self

        class _Handler:
            def __enter__(self):
                self.old = None
                if threading.current_thread() is threading.main_thread():
                    self.old = signal.signal(signal.SIGINT, self.handle)

            def handle(self, signum, frame):
                trainer.stop()
                signal.signal(signal.SIGINT, self.old)

            def __exit__(self, *exc):
                if self.old is not None:
                    signal.signal(signal.SIGINT, self.old)

        return _Handler()

