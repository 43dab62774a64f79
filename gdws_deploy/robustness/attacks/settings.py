"""Attack settings: budgets as the papers write them, the attacks by name, and the
normalization wrapper that keeps every budget in [0, 1] image units."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from gdws_deploy.errors import GdwsError

NORMS = ("linf", "l2", "l1")
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}
# name -> (method, norm, loss)
ATTACKS = {
    "pgd-linf": ("pgd", "linf", "ce"),
    "pgd-l2": ("pgd", "l2", "ce"),
    "pgd-l1": ("pgd", "l1", "ce"),
    "apgd-ce": ("apgd", "linf", "ce"),
    "apgd-dlr": ("apgd", "linf", "dlr"),
    "apgd-ce-l2": ("apgd", "l2", "ce"),
    "apgd-dlr-l2": ("apgd", "l2", "dlr"),
    "apgd-t": ("apgd-t", "linf", "dlr-targeted"),
    "fab-t": ("fab-t", "linf", "boundary"),
    "square": ("square", "linf", "margin"),
}
# AutoAttack's standard composition (Croce & Hein 2020), run in this order on the samples
# each leaves robust, with its standard 100 iterations unless --steps says otherwise
AUTOATTACK = ("apgd-ce", "apgd-t", "fab-t", "square")
AUTOATTACK_STEPS = 100
DEFAULT_STEPS = 10
DEFAULT_TARGETS = 9
DEFAULT_QUERIES = 5000


def parse_fraction(text: Union[str, float], what: str = "value") -> float:
    """A number or any number over any number ('8/255', '0.4/255', '1e-2') -> float >= 0.

    Papers write budgets as fractions of the pixel range, often with a decimal numerator;
    anything else (nan, inf, a zero or negative denominator, 'x/3') is a GdwsError.
    """
    numerator, slash, denominator = str(text).strip().partition("/")
    try:
        parts = [float(numerator), *([float(denominator)] if slash else [])]
        value = parts[0] / parts[1] if slash else parts[0]
    except (ValueError, ZeroDivisionError) as error:
        raise GdwsError(f"{what} {text!r} is not a number or fraction like 8/255") from error
    if not all(math.isfinite(part) and part >= 0 for part in parts):
        raise GdwsError(f"{what} must be a finite number >= 0, got {text}")
    return value


def parse_per_norm(text: Optional[str], what: str) -> Dict[str, float]:
    """'8/255' (every norm) or 'linf=8/255,l2=0.5' -> {norm: value}; '*' means every norm."""
    if text is None or not str(text).strip():
        return {}
    values = {}
    for part in str(text).split(","):
        norm, _, value = part.rpartition("=")
        norm = norm.strip() or "*"
        if norm not in (*NORMS, "*"):
            raise GdwsError(f"{what}: unknown norm {norm!r} (use {', '.join(NORMS)})")
        values[norm] = parse_fraction(value, what)
    return values


@dataclass(frozen=True)
class Attack:
    """One configured attack; `step_size` only matters for PGD (APGD sets its own),
    `targets` for APGD-T and FAB-T (target classes), `queries` for Square (its budget of
    model queries per sample, which replaces `steps`)."""

    name: str
    method: str
    norm: str
    loss: str
    eps: float
    steps: int
    step_size: float
    restarts: int = 1
    targets: int = DEFAULT_TARGETS
    queries: int = DEFAULT_QUERIES

    def to_dict(self) -> Dict:
        return asdict(self)


def make_attacks(
    names: Union[str, Sequence[str]],
    eps: Optional[Mapping[str, float]] = None,
    steps: Optional[int] = None,
    step_size: Optional[Mapping[str, float]] = None,
    restarts: int = 1,
    targets: int = DEFAULT_TARGETS,
    queries: int = DEFAULT_QUERIES,
) -> List[Attack]:
    """Attacks by name ('pgd-linf,apgd-ce', 'autoattack'); eps/step_size per norm ('*' for
    all).

    Defaults: eps 8/255 (l_inf), 0.5 (l_2), 12 (l_1); 10 steps (100 for autoattack's
    members); PGD step 2.5 * eps / steps; 9 target classes; 5000 Square queries.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise GdwsError("no attack given")
    for what, value in (("steps", steps), ("targets", targets), ("queries", queries)):
        if value is not None and (int(value) != value or value < 1):
            raise GdwsError(f"{what} must be a whole number >= 1, got {value}")
    if int(restarts) != restarts or restarts < 1:
        raise GdwsError(f"restarts must be a whole number >= 1, got {restarts}")
    eps, step_size = dict(eps or {}), dict(step_size or {})
    attacks = []
    for name, standard_steps in _expanded(names):
        method, norm, loss = ATTACKS[name]
        count = int(steps) if steps is not None else standard_steps
        budget = eps.get(norm, eps.get("*", DEFAULT_EPS[norm]))
        step = step_size.get(norm, step_size.get("*", 2.5 * budget / count))
        attacks.append(
            Attack(
                name,
                method,
                norm,
                loss,
                budget,
                count,
                step,
                int(restarts),
                int(targets),
                int(queries),
            )
        )
    return attacks


def _expanded(names: Sequence[str]) -> List[Tuple[str, int]]:
    """(attack name, its default steps), 'autoattack' spelled out, each name once."""
    known = (*ATTACKS, "autoattack")
    expanded: Dict[str, int] = {}
    for name in names:
        if name not in known:
            raise GdwsError(f"unknown attack {name!r} (choose from {', '.join(known)})")
        for member in AUTOATTACK if name == "autoattack" else (name,):
            standard = AUTOATTACK_STEPS if name == "autoattack" else DEFAULT_STEPS
            expanded.setdefault(member, standard)
    return list(expanded.items())


class Normalized(nn.Module):
    """`model((x - mean) / std)`: the attack sees [0, 1] images, the model its own input."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if any(s <= 0 for s in std):
            raise GdwsError(f"std must be positive, got {list(std)}")
        self.model = model
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).reshape(1, -1, 1, 1)
        )
        self.register_buffer(
            "std", torch.tensor(list(std), dtype=torch.float32).reshape(1, -1, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def parse_channels(text: Optional[str], what: str) -> Optional[List[float]]:
    """'0.49,0.48,0.45' -> [0.49, 0.48, 0.45]; None or '' -> None."""
    if text is None or not str(text).strip():
        return None
    try:
        return [float(part) for part in str(text).split(",")]
    except ValueError as error:
        raise GdwsError(f"{what} must be comma-separated numbers, got {text!r}") from error


def with_normalization(
    model: nn.Module, mean: Optional[Sequence[float]], std: Optional[Sequence[float]], channels: int
) -> nn.Module:
    """`model` itself without mean/std, else Normalized; each has 1 or `channels` values."""
    if not mean and not std:
        return model
    mean, std = list(mean or [0.0]), list(std or [1.0])
    for what, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise GdwsError(
                f"--{what} has {len(values)} values, the images have {channels} channels"
            )
    return Normalized(model, mean, std)
