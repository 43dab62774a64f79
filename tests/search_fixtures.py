"""One quick robustness check, shared by the search and sweep tests."""

from __future__ import annotations

import functools

from gdws_deploy.robustness.attacks import make_attacks
from gdws_deploy.robustness.check import RobustnessCheck
from gdws_deploy.robustness.data import load_dataset


@functools.lru_cache(maxsize=None)
def quick_check() -> RobustnessCheck:
    """PGD l_inf 0.05, 2 steps, on 100 digits test samples: enough to move accuracy."""
    attacks = tuple(make_attacks("pgd-linf", {"linf": 0.05}, steps=2))
    return RobustnessCheck(load_dataset("digits", limit=100), attacks)
