"""The fastest conversion within a robustness budget: `--max-robust-drop D`.

Users ask for "the fewest MACs that lose at most D of robust accuracy", not for a beta.
The MAC-reduction target is searched: a coarse grid going up brackets the answer (the
last target within D, the first beyond it), then bisection in log space narrows the
bracket to `resolution`. Every probe is converted with the same options (one SVD per
layer in all, through a shared SpectraCache; the same alphas or loss curves) and judged
by the same RobustnessCheck as the original, so a probe's drop is measured, not
estimated. Robust accuracy is noisy: every probe is reported, and the answer is the
largest target within D below the first one found beyond it.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from gdws_deploy.atomic import check_output_path
from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.graph import LoadedModel, load_model, save_model
from gdws_deploy.options import ConvertOptions
from gdws_deploy.passes.gdws.allocation import UnreachableTargetError
from gdws_deploy.passes.gdws.decompose import SpectraCache
from gdws_deploy.robustness.check import RobustnessCheck

if TYPE_CHECKING:
    from gdws_deploy.pipeline.convert import ConvertReport

COARSE_GRID = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
RESOLUTION = 0.05  # stop when the bracket's ends are within 5 % of each other


@dataclass(frozen=True)
class Probe:
    """One MAC-reduction target tried: what convert reached and what the check measured.

    reduction etc. are None when no allocation reaches the target (`note` says how far
    one can go); drop = the original's robust accuracy minus this one's.
    """

    target: float
    within: bool
    reduction: Optional[float] = None
    macs: Optional[int] = None
    clean_acc: Optional[float] = None
    robust_acc: Optional[float] = None
    drop: Optional[float] = None
    model: Optional[str] = None
    note: str = ""


@dataclass(frozen=True)
class OperatingPoint:
    """The search: the original's accuracy, every probe in the order run, and the answer
    (None when even the mildest probe lost more than `max_drop`)."""

    max_drop: float
    clean_acc: float
    robust_acc: float
    probes: Tuple[Probe, ...]
    best: Optional[Probe]
    check: Dict[str, Any]

    def to_dict(self) -> Dict[str, Any]:
        return {
            **asdict(self),
            "probes": [asdict(probe) for probe in self.probes],
            "best": asdict(self.best) if self.best else None,
        }


def check_max_drop(max_drop: float) -> float:
    """A drop is a fraction of accuracy in [0, 1): 0.01 is one point."""
    if not (math.isfinite(max_drop) and 0 <= max_drop < 1):
        raise GdwsError(
            f"max robust drop must be a fraction in [0, 1) (0.01 is one point), got {max_drop:g}"
        )
    return max_drop


def search_operating_point(
    model: Union[str, Path],
    max_drop: float,
    check: RobustnessCheck,
    workdir: Union[str, Path],
    convert_options: Optional[ConvertOptions] = None,
    grid: Sequence[float] = COARSE_GRID,
    resolution: float = RESOLUTION,
    on_probe: Optional[Callable[[Probe], None]] = None,
) -> OperatingPoint:
    """Search the MAC-reduction target of `model` whose robust drop under `check` stays
    within `max_drop`; probe models are written to `workdir` (best.model is the answer).

    convert_options: what every probe is converted with (allocation, alphas, loss_curves,
    include, ...) but its MAC target; a SpectraCache is added when it has none.
    """
    check_max_drop(max_drop)
    if not grid or any(t <= 1 for t in grid) or list(grid) != sorted(grid):
        raise GdwsError(f"search grid must rise from above 1, got {list(grid)}")
    if not resolution > 0:
        raise GdwsError(f"search resolution must be > 0, got {resolution}")
    loaded = load_model(model)
    options = _sharing_spectra(convert_options)
    baseline = check.evaluate(model)
    probes: List[Probe] = []

    def run(target: float) -> Probe:
        probe = _probe(
            loaded, target, options, check, baseline.robust_acc, max_drop, workdir, len(probes)
        )
        probes.append(probe)
        if on_probe is not None:
            on_probe(probe)
        return probe

    low, high, best = 1.0, None, None
    for target in grid:
        probe = run(target)
        if not probe.within:
            high = target
            break
        low, best = target, probe
    while high is not None and high / low > 1 + resolution:
        probe = run(math.sqrt(low * high))
        if probe.within:
            low, best = probe.target, probe
        else:
            high = probe.target
    return OperatingPoint(
        max_drop, baseline.clean_acc, baseline.robust_acc, tuple(probes), best, check.describe()
    )


def convert_within_drop(
    source: Union[str, Path],
    output: Union[str, Path],
    max_drop: float,
    check: RobustnessCheck,
    convert_options: Optional[ConvertOptions] = None,
    on_probe: Optional[Callable[[Probe], None]] = None,
) -> Tuple[OperatingPoint, Optional[ConvertReport]]:
    """`convert --max-robust-drop`: search, then write the answer to `output` as
    convert_file does (the conversion is deterministic: the same model as its probe;
    convert_options.check_parity says whether its parity is checked).

    The report is None, and nothing is written, when no target keeps the drop.
    """
    from gdws_deploy.pipeline.convert import convert_file

    check_max_drop(max_drop)
    check_output_path(output, source)
    options = _sharing_spectra(convert_options)
    with tempfile.TemporaryDirectory(prefix="gdws-search-") as workdir:
        point = search_operating_point(source, max_drop, check, workdir, options, on_probe=on_probe)
    point = replace(  # the probe files went with the temporary folder
        point,
        probes=tuple(replace(probe, model=None) for probe in point.probes),
        best=point.best and replace(point.best, model=None),
    )
    if point.best is None:
        return point, None
    report, _ = convert_file(source, output, options, mac_reduction=point.best.target)
    return point, report


def _sharing_spectra(options: Optional[ConvertOptions]) -> ConvertOptions:
    """`options` with a SpectraCache, so that the probes factor each layer once in all."""
    options = options or ConvertOptions()
    if options.spectra_cache is not None:
        return options
    return ConvertOptions.of(options, spectra_cache=SpectraCache())


def _probe(
    loaded: LoadedModel,
    target: float,
    options: ConvertOptions,
    check: RobustnessCheck,
    robust_acc: float,
    max_drop: float,
    workdir: Union[str, Path],
    index: int,
) -> Probe:
    """Convert at `target`, save, measure; out-of-reach targets count as beyond the drop."""
    from gdws_deploy.pipeline.convert import convert

    target = float(f"{target:.4g}")
    try:
        converted, report = convert(loaded, options, mac_reduction=target, check_parity=False)
    except UnreachableTargetError as error:
        return Probe(target, within=False, note=str(error))
    path = Path(workdir) / f"probe{index:02d}-{target:g}x.onnx"
    save_model(converted, path, like=loaded)
    result = check.evaluate(path)
    drop = robust_acc - result.robust_acc
    return Probe(
        target,
        within=drop <= max_drop + 1e-12,
        reduction=report.reduction,
        macs=report.macs_after,
        clean_acc=result.clean_acc,
        robust_acc=result.robust_acc,
        drop=drop,
        model=str(path),
    )
