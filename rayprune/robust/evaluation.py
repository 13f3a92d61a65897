"""Robust-accuracy evaluation: clean, PGD (CE and CW) and AutoAttack (APGD-CE, APGD-T,
FAB-T, Square).

:func:`robust_correct` returns, per sample, whether the model stays correct under each
attack of an :class:`EvalConfig`, plus "worst" (correct under every attack at once, the
number to report). :func:`summarize` turns that into accuracies.

Two protocols:

* ``autoattack`` (AutoAttack's): the attacks run in the given order, each only on the
  samples every earlier attack left correct, so an attack's array is the robustness
  *after* it and the ones before (cumulative), and the last one is "worst". With
  ``attacks = AUTOATTACK`` and the standard budgets (:meth:`EvalConfig.standard`) this is
  AutoAttack's standard version.
* ``every_attack``: every attack runs on *all* clean-correct samples, so the accuracy
  under an attack is exactly the accuracy under that attack alone; "worst" is the same
  as the cascade's, at a higher cost.

A sample misclassified at ``x`` counts as broken by every attack (``x`` is in every
threat model's ball), so no robust accuracy exceeds the clean one.

Randomness: each (batch, attack) pair draws from its own generator, seeded from one
number drawn from ``generator`` (or torch's global RNG), the batch's *global* index
(``first_batch`` + its position) and the attack's name. An attack's result therefore does
not depend on which other attacks run beside it (in ``every_attack``), and evaluating a
test set in shards of whole batches gives exactly the result of evaluating it at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
from torch import nn

from rayprune.choices import AUTOATTACK, EVAL_ATTACKS, EVAL_PROTOCOLS
from rayprune.robust.apgd import apgd_attack, apgd_targeted
from rayprune.robust.attacks import NORMS, AttackConfig, Norm, check_inputs, pgd_attack
from rayprune.robust.fab import fab_targeted
from rayprune.robust.modes import temporary_mode
from rayprune.robust.precision import full_precision
from rayprune.robust.square import square_attack

#: Key of the all-attacks-at-once correctness in :func:`robust_correct`'s result.
WORST = "worst"


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_positive_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Threat model and attack budgets of a robust evaluation.

    ``pgd_*``: PGD with random start for "pgd_ce" and "pgd_cw" (CW = margin loss);
    ``pgd_step_size=None`` means ``eps / 4``. ``apgd_*``: iterations per restart,
    number of target classes for "apgd_t", restarts per APGD run. ``fab_*``: FAB-T's
    iterations and target classes. ``square_queries``: Square's query budget (below
    5,000 its schedule of window sizes is compressed onto the budget). ``batch_size``:
    samples attacked together. ``attacks``: which of :data:`EVAL_ATTACKS` to run, in
    order (no repeats; a list is stored as a tuple); ``protocol``: see the module docstring.
    """

    norm: Norm = "linf"
    eps: float = 8 / 255
    pgd_steps: int = 20
    pgd_step_size: float | None = None
    apgd_steps: int = 100
    apgd_targets: int = 9
    apgd_restarts: int = 1
    fab_steps: int = 100
    fab_targets: int = 9
    square_queries: int = 5000
    batch_size: int = 256
    attacks: tuple[str, ...] = EVAL_ATTACKS
    protocol: str = "every_attack"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; allowed: {', '.join(NORMS)}")
        if not _is_positive_number(self.eps):
            raise ValueError(f"eps must be a finite number > 0; got {self.eps!r}")
        if not _is_int(self.pgd_steps, 1):
            raise ValueError(f"pgd_steps must be an int >= 1; got {self.pgd_steps!r}")
        if self.pgd_step_size is not None and not _is_positive_number(self.pgd_step_size):
            raise ValueError(
                f"pgd_step_size must be None or a finite number > 0; got {self.pgd_step_size!r}"
            )
        if not _is_int(self.apgd_steps, 1):
            raise ValueError(f"apgd_steps must be an int >= 1; got {self.apgd_steps!r}")
        if not _is_int(self.apgd_targets, 1):
            raise ValueError(f"apgd_targets must be an int >= 1; got {self.apgd_targets!r}")
        if not _is_int(self.apgd_restarts, 1):
            raise ValueError(f"apgd_restarts must be an int >= 1; got {self.apgd_restarts!r}")
        for name in ("fab_steps", "fab_targets", "square_queries"):
            if not _is_int(getattr(self, name), 1):
                raise ValueError(f"{name} must be an int >= 1; got {getattr(self, name)!r}")
        if self.protocol not in EVAL_PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; allowed: {', '.join(EVAL_PROTOCOLS)}")
        if not _is_int(self.batch_size, 1):
            raise ValueError(f"batch_size must be an int >= 1; got {self.batch_size!r}")
        attacks = self.attacks
        if isinstance(attacks, str) or not isinstance(attacks, Iterable):
            raise ValueError(f"attacks must be a sequence of attack names; got {attacks!r}")
        attacks = tuple(attacks)
        unknown = [a for a in attacks if a not in EVAL_ATTACKS]
        if unknown:
            raise ValueError(f"unknown attacks {unknown!r}; allowed: {', '.join(EVAL_ATTACKS)}")
        if not attacks:
            raise ValueError(f"attacks must name at least one of: {', '.join(EVAL_ATTACKS)}")
        if len(set(attacks)) != len(attacks):
            raise ValueError(f"attacks must not repeat a name; got {attacks!r}")
        object.__setattr__(self, "attacks", attacks)

    @property
    def step_size(self) -> float:
        """The PGD step size in effect (``pgd_step_size``, or ``eps / 4`` if unset)."""
        return self.eps / 4 if self.pgd_step_size is None else float(self.pgd_step_size)

    @classmethod
    def standard(cls, norm: Norm = "linf", eps: float = 8 / 255, *, batch_size: int = 256) -> EvalConfig:
        """AutoAttack's standard version: APGD-CE (100 iterations, 1 restart), APGD-T (100
        iterations, 9 target classes), FAB-T (100 iterations, 9 target classes) and Square
        (5,000 queries), as a cascade in that order."""
        return cls(norm=norm, eps=eps, apgd_steps=100, apgd_targets=9, apgd_restarts=1, fab_steps=100,
                   fab_targets=9, square_queries=5000, batch_size=batch_size, attacks=("clean", *AUTOATTACK),
                   protocol="autoattack")

    def reductions(self, num_classes: int) -> list[str]:
        """How this config falls short of AutoAttack's standard version (empty: it is the
        standard). Target classes count as standard when every other class is a target."""
        out = []
        if self.protocol != "autoattack" or tuple(a for a in self.attacks if a != "clean") != AUTOATTACK:
            out.append(f"{self.protocol} protocol over {', '.join(self.attacks)}")
        checks = (("apgd_ce" in self.attacks or "apgd_t" in self.attacks, self.apgd_steps, 100, "APGD steps"),
                  ("apgd_t" in self.attacks, self.apgd_targets, min(9, num_classes - 1), "APGD-T targets"),
                  ("fab_t" in self.attacks, self.fab_steps, 100, "FAB-T steps"),
                  ("fab_t" in self.attacks, self.fab_targets, min(9, num_classes - 1), "FAB-T targets"),
                  ("square" in self.attacks, self.square_queries, 5000, "Square queries"))
        out += [f"{what} {value} < {standard}" for used, value, standard, what in checks if used and value < standard]
        return out

    def pgd_config(self, loss: Literal["ce", "cw"]) -> AttackConfig:
        """The :class:`AttackConfig` of "pgd_ce" (``loss="ce"``) or "pgd_cw" (``loss="cw"``)."""
        if loss not in ("ce", "cw"):
            raise ValueError(f"PGD loss must be 'ce' or 'cw'; got {loss!r}")
        return AttackConfig(self.norm, self.eps, self.step_size, self.pgd_steps, loss, random_start=True)


def _attack(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: EvalConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    if name == "pgd_ce":
        return pgd_attack(model, x, y, config.pgd_config("ce"), generator=generator)
    if name == "pgd_cw":
        return pgd_attack(model, x, y, config.pgd_config("cw"), generator=generator)
    if name == "apgd_ce":
        return apgd_attack(model, x, y, norm=config.norm, eps=config.eps, steps=config.apgd_steps,
                           loss="ce", restarts=config.apgd_restarts, generator=generator)
    if name == "apgd_t":
        return apgd_targeted(model, x, y, norm=config.norm, eps=config.eps, steps=config.apgd_steps,
                             n_target_classes=config.apgd_targets, restarts=config.apgd_restarts,
                             generator=generator)
    if name == "fab_t":
        return fab_targeted(model, x, y, norm=config.norm, eps=config.eps, steps=config.fab_steps,
                            n_target_classes=config.fab_targets, generator=generator)
    if name == "square":
        return square_attack(model, x, y, norm=config.norm, eps=config.eps, n_queries=config.square_queries,
                             rescale_schedule=config.square_queries < 5000, generator=generator)
    raise ValueError(f"unknown attack {name!r}; allowed: {', '.join(EVAL_ATTACKS)}")


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return fallback


def robust_correct(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: EvalConfig,
    generator: torch.Generator | None = None,
    *,
    first_batch: int = 0,
) -> dict[str, np.ndarray]:
    """Per-sample correctness (bool arrays of length ``len(x)``) under each attack.

    Keys: every name in ``config.attacks`` and "worst" (correct under all of them). The
    attacks run on the clean-correct samples of a batch, all of them or, under the
    ``autoattack`` protocol, those still robust (see the module docstring), in batches of
    ``config.batch_size`` moved to the model's device; ``first_batch`` is the global index
    of the first batch (for shards of a larger set). The model is in eval mode during the
    evaluation and every submodule's mode is restored afterwards; parameter gradients are
    not touched. ``x`` holds pixel inputs in [0, 1].
    """
    if not isinstance(config, EvalConfig):
        raise TypeError(f"config must be an EvalConfig; got {type(config).__name__}")
    check_inputs(x, y)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("robust_correct needs autograd; call it outside torch.inference_mode()")
    n = x.shape[0]
    seed_device = generator.device if generator is not None else torch.device("cpu")
    base_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=seed_device).item())
    device = _model_device(model, x.device)
    results = {name: np.zeros(n, dtype=bool) for name in config.attacks}
    cascade = config.protocol == "autoattack"
    with temporary_mode(model, "eval"), full_precision(device):  # attacks in fp32 whatever the caller set
        for batch_index, start in enumerate(range(0, n, config.batch_size), start=first_batch):
            xb = x[start:start + config.batch_size].detach().to(device)
            yb = y[start:start + config.batch_size].to(device)
            with torch.no_grad():
                clean = model(xb).argmax(dim=1) == yb
            if "clean" in results:
                results["clean"][start:start + len(xb)] = clean.cpu().numpy()
            alive = clean.clone()
            for name in config.attacks:
                if name == "clean":
                    continue
                idx = (alive if cascade else clean).nonzero().squeeze(1)
                correct = torch.zeros_like(clean)
                if idx.numel() > 0:
                    seed = (base_seed + 1_000_003 * batch_index + EVAL_ATTACKS.index(name)) % 2**63
                    gen = torch.Generator().manual_seed(seed)
                    x_adv = _attack(name, model, xb[idx], yb[idx], config, gen)
                    with torch.no_grad():
                        correct[idx] = model(x_adv).argmax(dim=1) == yb[idx]
                results[name][start:start + len(xb)] = correct.cpu().numpy()
                alive &= correct
    results[WORST] = np.logical_and.reduce([results[name] for name in config.attacks])
    return results


def summarize(correct: dict[str, np.ndarray]) -> dict[str, float]:
    """Accuracy (mean of each boolean array) per key, plus "n", the number of samples.

    All arrays must have the same length; with no samples the accuracies are NaN.
    """
    if "n" in correct:
        raise ValueError("correct must not have a key 'n' (it is the sample count in the summary)")
    lengths = {key: len(np.asarray(value)) for key, value in correct.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"correctness arrays must have equal lengths; got {lengths}")
    n = next(iter(lengths.values()), 0)
    summary: dict[str, float] = {
        key: float(np.asarray(value, dtype=bool).mean()) if n else float("nan")
        for key, value in correct.items()
    }
    summary["n"] = n
    return summary


def broken_by(correct: dict[str, np.ndarray], attacks: tuple[str, ...]) -> np.ndarray:
    """Per sample, the first attack in ``attacks`` under which it is no longer correct
    ("clean" if misclassified as it is), or "" if it survived them all."""
    n = len(correct[WORST])
    out = np.full(n, "", dtype=object)
    for name in attacks:
        newly = (out == "") & ~np.asarray(correct[name], dtype=bool)
        out[newly] = name
    return out


def gradient_masking_warning(metrics: dict[str, float], attacks: tuple[str, ...], protocol: str,
                             threshold: float = 0.01) -> str | None:
    """A warning when Square, which needs no gradients, finds notably more than the gradient
    attacks (by ``threshold`` of the samples): the model's gradients may be masked, and
    gradient-based robust accuracy would overstate its robustness."""
    gradient = [a for a in attacks if a not in ("clean", "square")]
    if "square" not in attacks or not gradient:
        return None
    if protocol == "autoattack":
        before = metrics[attacks[attacks.index("square") - 1]]
    else:
        before = min(metrics[a] for a in gradient)
    if before - metrics["square"] <= threshold:
        return None
    return (f"Square (no gradients) lowered robust accuracy from {before:.3f} to {metrics['square']:.3f} below the "
            f"gradient attacks ({', '.join(gradient)}): the model may mask its gradients, so robust accuracy from "
            "gradient attacks alone would overstate its robustness")
