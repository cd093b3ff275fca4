"""The training loop in slices: one micro-batch forward and backward per `run_slice()`.

A slice is small (at most `micro_tokens` padded tokens, fewer when the machine is slow:
about SLICE_SECONDS of work) so that a caller sharing the CPU
with serving can stop between any two of them (tune/jobs.py runs them on the engine's step
thread, only when no realtime or standard request is in the engine). Optimizer steps
accumulate a batch's micro-batches; the loss is the mean over the batch's trained tokens.

Hyperparameters given as "auto" are chosen for small data sets (`resolve_hyperparameters`),
from the measurement in docs/fine_tuning.md: a few dozen invented facts, the learning rate
of transformers' default (2e-4) for 10 epochs left the model recalling none of them; the
auto settings below (more epochs, a 5x learning rate, small batches) make it recall them.
"""
from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass

import torch

from .data import Dataset
from .lora import LoRA, LoRAConfig, batch_tensors

BASE_LEARNING_RATE = 2e-4  # learning_rate_multiplier multiplies this
AUTO_MULTIPLIER = 5.0  # 1e-3: AdamW on LoRA factors, measured to memorize small fact sets
MAX_EPOCHS, MAX_BATCH, MAX_MULTIPLIER = 100, 256, 100.0
# Padded tokens per slice: at most MICRO_TOKENS, and fewer when the machine is slower, so
# that a slice lasts about SLICE_SECONDS (a realtime request may wait for one). Measured on the
# shared 2-core machine, SmolLM2-135M forward + backward ran at 10-110 tokens/s depending on
# the other processes' load: a fixed size gave slices of 1 to 27 s.
MICRO_TOKENS = 384
MIN_MICRO_TOKENS = 32
SLICE_SECONDS = 0.5
FINAL_LR_FRACTION = 0.1  # linear decay from the learning rate to this share of it


@dataclass
class Hyperparameters:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float

    def as_dict(self) -> dict:
        return {"n_epochs": self.n_epochs, "batch_size": self.batch_size,
                "learning_rate_multiplier": self.learning_rate_multiplier}


def resolve_hyperparameters(given: dict, n_examples: int) -> Hyperparameters:
    """Numbers as given; "auto" (or missing) from the data set's size: small sets get small
    batches and many epochs (about 150 optimizer steps in all, between 3 and 30 epochs)."""
    batch = given.get("batch_size", "auto")
    batch = max(1, min(8, n_examples // 8)) if batch in ("auto", None) else int(batch)
    epochs = given.get("n_epochs", "auto")
    if epochs in ("auto", None):
        steps_per_epoch = math.ceil(n_examples / batch)
        epochs = max(3, min(30, math.ceil(150 / steps_per_epoch)))
    mult = given.get("learning_rate_multiplier", "auto")
    mult = AUTO_MULTIPLIER if mult in ("auto", None) else float(mult)
    return Hyperparameters(int(epochs), batch, mult)


class Trainer:
    def __init__(self, lora: LoRA, train: Dataset, hyper: Hyperparameters, seed: int = 0,
                 valid: Dataset | None = None, micro_tokens: int = MICRO_TOKENS, pad_id: int = 0):
        self.lora, self.train, self.valid, self.hyper, self.seed = lora, train, valid, hyper, seed
        self.micro_tokens = self.max_micro_tokens = micro_tokens
        self.pad_id = pad_id
        self.lr = BASE_LEARNING_RATE * hyper.learning_rate_multiplier
        self.opt = torch.optim.AdamW(lora.parameters(), lr=self.lr, weight_decay=0.0)
        self.steps_per_epoch = math.ceil(len(train.rows) / hyper.batch_size)
        self.total_steps = self.steps_per_epoch * hyper.n_epochs
        self.step = 0  # optimizer steps done
        self.trained_tokens = 0  # tokens through the model (prompts too), as OpenAI counts them
        self._queue: list | None = None  # the current step's micro-batches still to run
        self._acc = [0.0, 0, 0]  # loss sum, trained tokens, correct of the current step

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def _step_rows(self, step: int) -> list:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train.rows), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        b = self.hyper.batch_size
        return [self.train.rows[i] for i in order[k * b:(k + 1) * b].tolist()]

    def micro_batches(self, rows: list) -> list[list]:
        """Rows by length, cut where the padded batch would pass micro_tokens."""
        out, cur = [], []
        for r in sorted(rows, key=lambda r: len(r.ids)):
            if cur and (len(cur) + 1) * len(r.ids) > self.micro_tokens:
                out.append(cur)
                cur = []
            cur.append(r)
        return out + [cur] if cur else out

    def _lr_at(self, step: int) -> float:
        frac = step / max(1, self.total_steps - 1)
        return self.lr * (1 - (1 - FINAL_LR_FRACTION) * frac)

    def run_slice(self) -> dict | None:
        """One micro-batch; returns the step's metrics when it completed an optimizer step."""
        if self.done:
            return None
        if self._queue is None:
            rows = self._step_rows(self.step)
            self._queue = self.micro_batches(rows)
            self._step_trained = sum(r.trained for r in rows)
            self._acc = [0.0, 0, 0]
        rows = self._queue.pop(0)
        ids, mask = batch_tensors(rows, self.pad_id)
        started = time.perf_counter()
        loss, n, correct = self.lora.loss(ids, mask)
        (loss / self._step_trained).backward()
        rate = ids.numel() / max(time.perf_counter() - started, 1e-6)
        self.micro_tokens = int(min(self.max_micro_tokens, max(MIN_MICRO_TOKENS, rate * SLICE_SECONDS)))
        self._acc[0] += float(loss.detach())
        self._acc[1] += n
        self._acc[2] += correct
        self.trained_tokens += sum(len(r.ids) for r in rows)
        if self._queue:
            return None
        for group in self.opt.param_groups:
            group["lr"] = self._lr_at(self.step)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._queue = None
        self.step += 1
        total, n, correct = self._acc
        return {"step": self.step, "train_loss": total / max(n, 1), "train_mean_token_accuracy": correct / max(n, 1),
                "tokens": n, "learning_rate": self._lr_at(self.step - 1)}

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> tuple[float, float]:
        """(mean loss, mean token accuracy) over a data set's trained tokens."""
        total = n = correct = 0
        for rows in self.micro_batches(data.rows):
            loss, k, c = self.lora.loss(*batch_tensors(rows, self.pad_id))
            total, n, correct = total + float(loss), n + k, correct + c
        return total / max(n, 1), correct / max(n, 1)

    # -- resuming -----------------------------------------------------------------------------

    def save_state(self, path: str) -> None:
        """Factors, optimizer and completed steps, atomically. Between the micro-batches of a
        step it saves the last full step (gradients are not saved; that step runs again)."""
        buf = io.BytesIO()
        torch.save({"lora": self.lora.state(), "opt": self.opt.state_dict(), "step": self.step,
                    "trained_tokens": self.trained_tokens}, buf)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_state(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.lora.load_state(state["lora"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.trained_tokens = state["step"], state["trained_tokens"]
        self._queue = None


def new_trainer(base, train: Dataset, given: dict, seed: int = 0, valid: Dataset | None = None,
                config: LoRAConfig | None = None, hyper: Hyperparameters | None = None) -> Trainer:
    hyper = hyper or resolve_hyperparameters(given, len(train.rows))
    pad = next(iter(base.tokenizer.eos_token_ids), 0) if getattr(base, "tokenizer", None) else 0
    return Trainer(LoRA(base, config or LoRAConfig(), seed), train, hyper, seed, valid, pad_id=pad)
