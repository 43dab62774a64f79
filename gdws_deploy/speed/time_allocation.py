"""One option per layer for a speed goal: the least error within a speed and a MAC budget.

Each layer offers a few options (dense, or m kernels on every channel), each with the error
it incurs, its MACs and its seconds measured inside the whole model (context_timing.py).
Picking one per layer for the least total error under both budgets is a multiple-choice
knapsack with two constraints. The speed goal (a time budget, or a speed-up at least some
ratio of the MAC reduction: both linear in the options' seconds and MACs) goes into the
objective at a price mu (Lagrangian relaxation); the MAC constraint is solved exactly by
dynamic programming over MACs rounded up to 1/MAC_STEPS of the budget (so a solution never
exceeds it); mu is bisected to the least price whose solution meets the speed goal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from gdws_deploy.errors import GdwsError
from gdws_deploy.passes.gdws.allocation import UnreachableTargetError

MAC_STEPS = 2048
_BISECTIONS = 60


class SlowerThanBudgetError(UnreachableTargetError):
    """Even the fastest choice within the MAC budget misses the speed goal; `fastest` is
    that choice."""

    def __init__(self, fastest: List[Option]) -> None:
        super().__init__("even the fastest choice within the MAC budget misses the speed goal")
        self.fastest = fastest


@dataclass(frozen=True)
class Option:
    """One way to run a layer: `per_channel` kernels on every channel (0: the dense conv),
    in `lowering`, and what that costs."""

    per_channel: int
    lowering: str
    error: float
    macs: float
    seconds: float


@dataclass(frozen=True)
class Budget:
    """What the whole model (its fixed part included) may cost: at most `macs` MACs, and
    one speed goal: at most `seconds`, or a speed-up of at least `ratio` times its MAC
    reduction against the original's `original_macs` and `original_seconds`."""

    macs: Optional[float] = None
    seconds: Optional[float] = None
    ratio: Optional[float] = None
    original_macs: float = 0.0
    original_seconds: float = 0.0

    def load(self, seconds: np.ndarray, macs: np.ndarray) -> np.ndarray:
        """What the speed goal counts of options costing `seconds` and `macs`: the goal
        holds when the loads of the model's parts sum to at most 0."""
        if (self.seconds is None) == (self.ratio is None):
            raise GdwsError("a speed goal is a time budget or a speed-up / MAC-reduction ratio")
        if self.seconds is not None:
            return seconds
        # speed-up >= ratio * reduction  <=>  ratio * t / T - m / M <= 0
        return self.ratio * seconds / self.original_seconds - macs / self.original_macs

    def allowance(self) -> float:
        """What the loads may sum to besides the time budget itself."""
        return self.seconds if self.seconds is not None else 0.0


def choose_options(
    options: Sequence[Sequence[Option]],
    fixed_macs: float,
    fixed_seconds: float,
    budget: Budget,
) -> List[Option]:
    """The option of each layer with the least total error within `budget`.

    options[l]: layer l's options; fixed_*: the model outside the layers. Raises
    SlowerThanBudgetError when even the fastest choice within the MAC budget misses the
    speed goal.
    """
    if not options or any(not layer for layer in options):
        raise GdwsError("every layer needs at least one option")
    units, free = _mac_units(options, fixed_macs, budget.macs)
    errors = [np.array([o.error for o in layer], dtype=np.float64) for layer in options]
    loads = [
        budget.load(np.array([o.seconds for o in layer]), np.array([o.macs for o in layer]))
        for layer in options
    ]
    left = budget.allowance() - float(budget.load(np.array(fixed_seconds), np.array(fixed_macs)))

    def solve(price: float) -> Tuple[List[int], float]:
        objective = [e + price * load for e, load in zip(errors, loads)]
        picks = _knapsack(objective, units, free)
        return picks, float(sum(load[k] for load, k in zip(loads, picks)))

    picks, spent = solve(0.0)
    if spent <= left:
        return [layer[k] for layer, k in zip(options, picks)]
    tiny = np.finfo(float).tiny
    scale = max(sum(float(e.max()) for e in errors), tiny) / max(
        sum(float(np.abs(load).max()) for load in loads), tiny
    )
    high = scale * 1e9
    fastest, spent = solve(high)
    if spent > left:
        raise SlowerThanBudgetError([layer[k] for layer, k in zip(options, fastest)])
    low = 0.0
    for _ in range(_BISECTIONS):
        middle = np.sqrt(max(low, scale * 1e-9) * high)
        picks, spent = solve(middle)
        if spent <= left:
            high, fastest = middle, picks
        else:
            low = middle
    return [layer[k] for layer, k in zip(options, fastest)]


def _mac_units(
    options: Sequence[Sequence[Option]], fixed_macs: float, mac_budget: Optional[float]
) -> Tuple[List[np.ndarray], int]:
    """Each option's MACs in budget steps (rounded up) and the steps the layers may use."""
    if mac_budget is None:
        return [np.zeros(len(layer), dtype=np.int64) for layer in options], 0
    unit = mac_budget / MAC_STEPS
    free = MAC_STEPS - int(np.ceil(fixed_macs / unit))
    units = [
        np.ceil(np.array([o.macs for o in layer]) / unit).astype(np.int64) for layer in options
    ]
    if free < sum(int(u.min()) for u in units):
        raise UnreachableTargetError("no choice of options fits the MAC budget")
    return units, free


def _knapsack(objective: Sequence[np.ndarray], units: Sequence[np.ndarray], free: int) -> List[int]:
    """Option per layer minimizing the summed objective with summed units <= free."""
    best = np.zeros(free + 1)  # best[b]: least objective of the layers so far within b units
    choices = []
    for cost, size in zip(objective, units):
        candidates = np.full((len(cost), free + 1), np.inf)
        for k, (c, s) in enumerate(zip(cost, size)):
            if s <= free:
                candidates[k, s:] = best[: free + 1 - s] + c
        pick = np.argmin(candidates, axis=0)
        best = candidates[pick, np.arange(free + 1)]
        choices.append(pick)
    picks, left = [], free
    for pick, size in zip(reversed(choices), reversed(units)):
        k = int(pick[left])
        picks.append(k)
        left -= int(size[k])
    return picks[::-1]
