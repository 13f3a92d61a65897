"""One epoch of adversarial training, as a fixed number of optimiser steps.

An epoch here is a step budget, not a pass over the data: the scoring run trains on a
small subset for as many steps as a full run would take (see docs/method.md), so batches come
from an endless reshuffled stream over the samples. Where a batch comes from is a
*batch source* (anything with ``next() -> (images, labels)``): samples held in memory and
drawn by an index stream (:class:`IndexedBatches`), an endless stream of decoded batches
(:class:`StreamedBatches`, fed by Ray Data in the final training), or several of them
concatenated at fixed counts (:class:`ConcatBatches`: a streamed synthetic part and an
in-memory real part).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from rayprune.choices import AT_LOSSES, PRECISIONS
from rayprune.robust.at_losses import pgd_at_loss, trades_loss
from rayprune.robust.attacks import AttackConfig
from rayprune.robust.ema import ModelEMA
from rayprune.robust.precision import autocast
from rayprune.robust.training import augment, learning_rate, to_float_images
from rayprune.validation import check_choice


@dataclass(frozen=True)
class ATConfig:
    """Everything a training step needs besides the model, data and attack."""

    loss: str = "pgd_at"
    trades_beta: float = 5.0
    label_smoothing: float = 0.0
    lr: float = 0.1
    schedule: str = "cosine"
    warmup_steps: int = 0
    augment: bool = True
    precision: str = "fp32"  # or "bf16" / "fp16": autocast of the step and its attack

    def __post_init__(self) -> None:
        check_choice(self.loss, "loss", AT_LOSSES)
        check_choice(self.precision, "precision", PRECISIONS)


class BatchStream:
    """Endless stream of index batches: each pass over ``n`` samples is a fresh permutation.

    Its state (position and pass count) is two integers, so a resumed run continues
    with exactly the batches it would have drawn.
    """

    def __init__(self, n: int, batch_size: int, seed: int, passes: int = 0, position: int = 0) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"n and batch_size must be >= 1; got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.passes, self.position = passes, position
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.passes]).permutation(self.n)

    def next(self) -> np.ndarray:
        """The next ``batch_size`` indices (wrapping into the next pass when needed)."""
        parts, need = [], self.batch_size
        while need:
            take = self._order[self.position : self.position + need]
            parts.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == self.n:
                self.passes, self.position = self.passes + 1, 0
                self._order = self._permutation()
        return np.concatenate(parts)

    def state(self) -> dict[str, int]:
        return {"passes": self.passes, "position": self.position}


class BatchSource(Protocol):
    """Where training batches come from: ``next()`` gives float images (B, C, H, W) in
    [0, 1] and int64 labels (B,), on the training device."""

    def next(self) -> tuple[torch.Tensor, torch.Tensor]: ...


class IndexedBatches:
    """Batches of samples held in memory (``images`` float (N, C, H, W) on the device),
    drawn by an index stream (:class:`BatchStream` or :class:`MixedBatchStream`)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, stream: BatchStream | MixedBatchStream) -> None:
        self.images, self.labels, self.stream = images, labels, stream

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.stream.next()).to(self.images.device)
        return self.images[idx], self.labels[idx]


class StreamedBatches:
    """An endless stream of batches from passes over a data source.

    ``passes(k)`` returns an iterable over the ``k``-th pass (0, 1, ...) as
    ``(uint8 images (B, H, W, C), labels (B,))`` numpy pairs of the batch size; each is
    converted to float on ``device`` as it is drawn. A pass that yields no batch at all is
    an error (it would loop forever). ``pass_index``: the pass to start with (a resumed run
    starts a fresh pass; the stream itself cannot be replayed).

    ``wait_seconds``: the time spent waiting for the stream to hand over batches (starting
    passes included), summed until the caller resets it: whether training is starved.
    ``clock``: a monotonic clock in seconds (a fake one in tests).
    """

    def __init__(self, passes: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]], device: torch.device | str,
                 pass_index: int = 0, clock: Callable[[], float] = time.perf_counter) -> None:
        self.passes, self.device, self.pass_index = passes, torch.device(device), pass_index
        self._current: Iterator | None = None
        self.batches_in_pass = 0
        self.wait_seconds, self._clock = 0.0, clock

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        started = self._clock()
        try:
            images, labels = self._next_rows()
        finally:
            self.wait_seconds += self._clock() - started
        labels_t = torch.as_tensor(np.require(labels, np.int64, requirements="W"))  # Arrow's are read-only
        if self.device.type != "cuda":
            return to_float_images(images), labels_t
        # On CUDA: the uint8 batch (a quarter of the float bytes) goes from pinned host
        # memory without blocking, and becomes float on the device.
        images_t = torch.as_tensor(np.require(images, requirements="W")).pin_memory()
        return (to_float_images(images_t.to(self.device, non_blocking=True)),
                labels_t.pin_memory().to(self.device, non_blocking=True))

    def _next_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The next (uint8 images, labels) of the stream, going on to the next pass as one ends."""
        while True:
            if self._current is None:
                self._current, self.batches_in_pass = iter(self.passes(self.pass_index)), 0
            try:
                images, labels = next(self._current)
            except StopIteration:
                if self.batches_in_pass == 0:
                    raise RuntimeError(f"pass {self.pass_index} of the training stream gave no batch: the stream holds "
                                       "fewer rows than one batch per worker") from None
                self._current, self.pass_index = None, self.pass_index + 1
                continue
            self.batches_in_pass += 1
            return images, labels


class ConcatBatches:
    """Each batch is the next batch of every source, concatenated (e.g. a streamed synthetic
    part and an in-memory real part at fixed counts)."""

    def __init__(self, sources: list[BatchSource]) -> None:
        if not sources:
            raise ValueError("ConcatBatches needs at least one source")
        self.sources = sources

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [s.next() for s in self.sources]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: BatchSource,
    attack: AttackConfig,
    recipe: ATConfig,
    *,
    steps: int,
    first_step: int,
    total_steps: int,
    ema: ModelEMA | None = None,
    generator: torch.Generator | None = None,
    on_step=None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """Run ``steps`` optimiser steps of PGD-AT or TRADES; return mean loss and accuracies.

    ``batches`` gives each step's float images and labels on the model's device;
    ``first_step`` and ``total_steps`` place these steps on the learning-rate schedule. The attack and the
    loss run under ``recipe.precision``'s autocast; ``scaler`` (needed for fp16, see
    :func:`rayprune.robust.precision.grad_scaler`) scales the loss before the backward pass.
    """
    model.train()
    device = next(model.parameters()).device
    totals: dict[str, float] = {}
    for i in range(steps):
        step = first_step + i
        lr = learning_rate(step, total_steps, recipe.lr, recipe.schedule, recipe.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batches.next()
        if recipe.augment:
            x = augment(x, generator=generator)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(recipe.precision, device):
            if recipe.loss == "trades":
                loss, stats = trades_loss(
                    model, x, y, attack, beta=recipe.trades_beta, label_smoothing=recipe.label_smoothing,
                    generator=generator,
                )
            else:
                loss, stats = pgd_at_loss(model, x, y, attack, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if ema is not None:
            ema.update(model)
        stats["lr"] = lr
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value
        if on_step is not None:
            on_step(step)
    return {key: value / max(1, steps) for key, value in totals.items()}


class MixedBatchStream:
    """Batches mixing groups at fixed counts, e.g. 80% synthetic and 20% real samples.

    ``groups`` are arrays of positions (into the caller's sample arrays); each group has
    its own reshuffled endless stream, and every batch takes ``counts[i]`` positions from
    group ``i``. Like ``BatchStream`` it replays exactly from a step count.
    """

    def __init__(self, groups: list[np.ndarray], counts: list[int], seed: int) -> None:
        if len(groups) != len(counts) or not groups:
            raise ValueError("groups and counts must be non-empty and of the same length")
        live = [(g, c) for g, c in zip(groups, counts) if c > 0]
        for g, c in live:
            if len(g) == 0:
                raise ValueError(f"a group asked for {c} samples per batch is empty")
        self.groups = [g for g, _ in live]
        self.streams = [BatchStream(len(g), c, seed=seed * 31 + i) for i, (g, c) in enumerate(live)]

    def next(self) -> np.ndarray:
        return np.concatenate([g[s.next()] for g, s in zip(self.groups, self.streams)])


def mix_counts(batch_size: int, fraction: float, n_first: int, n_second: int) -> list[int]:
    """Per-batch counts of two groups: ``fraction`` of the batch from the first group.

    A group with no samples gives its share to the other.
    """
    first = int(round(batch_size * fraction))
    if n_first == 0:
        first = 0
    elif n_second == 0:
        first = batch_size
    return [first, batch_size - first]
