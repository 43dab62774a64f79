"""What a conversion is asked to do, as one frozen, typed value.

Every layer of the tool passes this object on instead of keyword dictionaries: the CLI's
argument groups build it, the pipeline derives variants of it (`replace`), and
convert() reads it. Calibration products (loss curves, a shared SVD cache, alphas) are
fields too, so a calibrated conversion is just another ConvertOptions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from gdws_deploy.errors import GdwsError

if TYPE_CHECKING:
    from gdws_deploy.passes.gdws.allocation import LossCurve
    from gdws_deploy.passes.gdws.decompose import SpectraCache
    from gdws_deploy.speed.backends import Backend

AlphaSource = Union[str, Path, Mapping[str, np.ndarray], None]
# What to time lowerings on: "ort", "trt", a speed.backends.Backend, or None (no tuning).
TuneSource = Union[str, "Backend", None]
# The targets, in the order they are described in a report.
TARGETS = ("beta", "budget", "mac_reduction", "rank_share")
# The options only method "atmc" takes.
ATMC_ONLY = ("rank_share", "sparsity", "bits")
SPEED_GOALS = ("speedup", "speed_ratio")
# The options that choose which layers are candidates at all.
SELECTION = ("all_layers", "include", "exclude")


@dataclass(frozen=True)
class ConvertOptions:
    """One conversion's settings.

    Targets (exactly one; a speed goal may join a MAC reduction): beta (per-layer LEGO error
    bound), budget (per-layer MEGO kernel count), mac_reduction (whole model R times fewer
    MACs, least error), speedup (at least S times faster on the tune backend), speed_ratio (a
    speed-up at least E times the MAC reduction reached, with mac_reduction).
    Calibration: alphas (npz path or mapping, Conv name -> (C,) channel weights), allocation
    (how a MAC target shares kernels across layers), loss_curves (from
    robustness.sensitivity), spectra_cache (SVDs reused across calls on one model).
    Selection: all_layers (the first conv too), include / exclude (globs on node names).
    Lowering and timing: lowering (auto, gather, pad, sum, fold, dense), tune (backend to
    time forms on), tune_batch, tune_cache (JSON of measured layer times).
    check_parity: run original and converted in onnxruntime and report the deviation.
    method: the compression pass (passes.registry: "gdws").
    ATMC (method "atmc"): rank_share (rank kept per layer, a share of full rank, instead of
    a MAC target), sparsity (share of the layers' weights kept as a sparse residual, across
    the model), bits (k-means weight sharing: 2^bits values per factor and layer).
    int8: quantize the pass's output to INT8 (QDQ, static) after it is written;
    int8_calibration: the input samples (N, ...) float that static calibration runs on,
    required with int8.
    """

    beta: Optional[float] = None
    budget: Optional[int] = None
    mac_reduction: Optional[float] = None
    speedup: Optional[float] = None
    speed_ratio: Optional[float] = None
    alphas: AlphaSource = None
    allocation: str = "auto"
    loss_curves: Optional[Mapping[str, LossCurve]] = None
    spectra_cache: Optional[SpectraCache] = None
    all_layers: bool = False
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    lowering: str = "auto"
    tune: TuneSource = None
    tune_batch: Optional[int] = None
    tune_cache: Union[str, Path, None] = None
    check_parity: bool = True
    method: str = "gdws"
    rank_share: Optional[float] = None
    sparsity: Optional[float] = None
    bits: Optional[int] = None
    int8: bool = False
    # an array compares elementwise and prints every sample: neither belongs in ==/repr
    int8_calibration: Optional[np.ndarray] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # globs arrive as lists from click and as tuples from code: one hashable form
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @classmethod
    def of(cls, options: Optional[ConvertOptions] = None, **changes: Any) -> ConvertOptions:
        """`options` (default: all defaults) with `changes`; an unknown name is an error."""
        unknown = sorted(set(changes) - {field.name for field in fields(cls)})
        if unknown:
            raise GdwsError(f"unknown conversion option(s): {', '.join(unknown)}")
        return replace(options or cls(), **changes)

    @property
    def has_speed_goal(self) -> bool:
        return self.speedup is not None or self.speed_ratio is not None

    @property
    def selection(self) -> Dict[str, Any]:
        """The layer-selection options, for whatever measures the same layers convert takes."""
        return {name: getattr(self, name) for name in SELECTION}

    def describe_target(self) -> str:
        """Check that exactly one target is given (a speed goal may join a MAC reduction)
        and that each value is in range; the target as a report names it."""
        atmc = [name for name in ATMC_ONLY if getattr(self, name) is not None]
        if atmc and self.method != "atmc":
            raise GdwsError(f"{', '.join(atmc)}: method 'atmc' only, not {self.method!r}")
        given = {name: getattr(self, name) for name in TARGETS if getattr(self, name) is not None}
        goals = {
            name: getattr(self, name) for name in SPEED_GOALS if getattr(self, name) is not None
        }
        if len(goals) > 1:
            raise GdwsError("give one speed goal: a speed-up or a speed-up / MAC-reduction ratio")
        _check_speed_goal(self.speedup, self.speed_ratio, self.mac_reduction)
        if goals and (self.beta is not None or self.budget is not None):
            raise GdwsError("a speed goal goes alone or with a MAC reduction, not beta/budget")
        if not goals and len(given) != 1:
            named = ", ".join(given) or "none"
            choices = ", ".join(TARGETS if self.method == "atmc" else TARGETS[:-1])
            raise GdwsError(f"give exactly one of {choices} (got {named})")
        _check_targets(self.beta, self.budget, self.mac_reduction)
        return " ".join(f"{name}={value:g}" for name, value in {**given, **goals}.items())


def _check_speed_goal(
    speedup: Optional[float], speed_ratio: Optional[float], mac_reduction: Optional[float]
) -> None:
    if speedup is not None and not (np.isfinite(speedup) and speedup >= 1):
        raise GdwsError(f"speed-up must be a finite number >= 1, got {speedup}")
    if speed_ratio is not None:
        if not (np.isfinite(speed_ratio) and speed_ratio > 0):
            raise GdwsError(f"speed ratio must be a finite number > 0, got {speed_ratio}")
        if mac_reduction is None:
            raise GdwsError("a speed ratio is a share of the MAC reduction: give one too")


def _check_targets(
    beta: Optional[float], budget: Optional[int], mac_reduction: Optional[float]
) -> None:
    if beta is not None and not (np.isfinite(beta) and beta >= 0):
        raise GdwsError(f"beta must be a finite number >= 0, got {beta}")
    if budget is not None and (int(budget) != budget or budget < 1):
        raise GdwsError(f"budget must be a whole number of kernels >= 1, got {budget}")
    if mac_reduction is not None and not (np.isfinite(mac_reduction) and mac_reduction >= 1):
        raise GdwsError(f"MAC reduction must be a finite number >= 1, got {mac_reduction}")
