"""Attacks under l_inf, l_2 and l_1 budgets, on inputs in [0, 1], vectorized over the batch.

White-box: PGD, APGD (CE, DLR, targeted DLR) and FAB-T through the torch mirror's gradients;
score-based: Square, which only queries logits (the check against gradient masking).
`autoattack` is AutoAttack's standard composition (APGD-CE, APGD-T, FAB-T, Square).
Every attack keeps, per sample, its lowest-margin input (margin z_y - max_{j != y} z_j), so
an adversarial example once found is never lost; `worst_case` merges attacks and restarts
the same way and only spends effort on samples not yet broken. Randomness is per sample
(seeding.SampleRandom): a verdict never depends on the batching.

Modules: settings (names, budgets, normalization), seeding, geometry (norms, projections),
losses, gradient (PGD, APGD, APGD-T), fab (FAB-T), square (Square), suite (worst case).
"""

from gdws_deploy.robustness.attacks.geometry import (
    norm_of,
    project,
    random_start,
    steepest_direction,
)
from gdws_deploy.robustness.attacks.gradient import apgd, apgd_checkpoints, pgd
from gdws_deploy.robustness.attacks.losses import dlr_loss, margin
from gdws_deploy.robustness.attacks.seeding import SampleRandom
from gdws_deploy.robustness.attacks.settings import (
    ATTACKS,
    DEFAULT_EPS,
    NORMS,
    Attack,
    Normalized,
    make_attacks,
    parse_channels,
    parse_fraction,
    parse_per_norm,
    with_normalization,
)
from gdws_deploy.robustness.attacks.suite import WorstCase, run_attack, worst_case

__all__ = [
    "ATTACKS",
    "DEFAULT_EPS",
    "NORMS",
    "Attack",
    "Normalized",
    "SampleRandom",
    "WorstCase",
    "apgd",
    "apgd_checkpoints",
    "dlr_loss",
    "make_attacks",
    "margin",
    "norm_of",
    "parse_channels",
    "parse_fraction",
    "parse_per_norm",
    "pgd",
    "project",
    "random_start",
    "run_attack",
    "steepest_direction",
    "with_normalization",
    "worst_case",
]
