"""The pictures of a sweep and of a comparison: robust accuracy against throughput, and
against MACs (sweep) or weight storage (compare).

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no display, no global
state), so it renders the same on a headless server as on a laptop.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

from gdws_deploy.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from gdws_deploy.pipeline.results import CompareResult, MeasuredPoint, SweepResult

# kind -> (legend entry, marker, colour, size, label offset in points)
STYLES = {
    "original": ("original", "*", "black", 220, (6, 6)),
    "target": ("GDWS", "o", "tab:blue", 60, (6, 6)),
    "max-drop": ("max robust drop", "D", "tab:red", 80, (6, -12)),  # below: it sits among
}
# One colour per compared method, in --methods order.
_METHOD_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def sweep_figure(result: SweepResult) -> Figure:
    """Two panels sharing the y axis: robust accuracy vs images/s and vs MACs."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.6), layout="constrained")
    speed, macs = figure.subplots(1, 2, sharey=True)
    _panel(speed, result.points, lambda p: p.images_per_s, result)
    speed.set_xlabel(f"throughput (images/s, onnxruntime CPU, batch {result.bench.batch})")
    _panel(macs, result.points, lambda p: p.macs / 1e6, result)
    macs.set_xlabel("MACs per image (millions)")
    macs.invert_xaxis()  # faster to the right in both panels
    speed.set_ylabel(f"robust accuracy (%), {_attack_text(result)}")
    figure.suptitle(
        f"{Path(result.model).name}: GDWS ({result.allocation}) on "
        f"{result.check['samples']} samples of {result.check['dataset']}"
    )
    return figure


def compare_figure(result: CompareResult) -> Figure:
    """Two panels sharing the y axis: robust accuracy (95 % interval as error bars) vs
    images/s and vs weight storage, one colour per method, its targets joined in order."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.6), layout="constrained")
    speed, size = figure.subplots(1, 2, sharey=True)
    colours = iter(_METHOD_COLOURS)
    groups = [("original", [result.original], "black", "*")]
    for method in result.methods:
        chosen = [p for p in result.points if p.method == method]
        groups.append((method, chosen, next(colours), "o"))
    for axes, x_of in (
        (speed, lambda p: p.images_per_s),
        (size, lambda p: p.size_bits / 8 / 1024),
    ):
        for name, points, colour, marker in groups:
            xs = [x_of(p) for p in points]
            ys = [100 * p.robust_acc for p in points]
            low = [y - 100 * p.robust_ci95[0] for p, y in zip(points, ys)]
            high = [100 * p.robust_ci95[1] - y for p, y in zip(points, ys)]
            axes.errorbar(
                xs,
                ys,
                yerr=[low, high],
                color=colour,
                marker=marker,
                label=name,
                linewidth=1,
                capsize=2,
                markersize=9 if marker == "*" else 5,
            )
        axes.grid(True, alpha=0.3)
        axes.legend(loc="best", fontsize=8)
    speed.set_xlabel(f"throughput (images/s, onnxruntime CPU, batch {result.bench.batch})")
    size.set_xlabel("weight storage (KiB: non-zeros x bits)")
    size.invert_xaxis()  # smaller to the right in both panels
    speed.set_ylabel(f"robust accuracy (%), {_attack_text(result)}")
    figure.suptitle(
        f"{Path(result.model).name}: methods at "
        f"{', '.join(f'{r:g}x' for r in result.mac_reductions)} fewer MACs, "
        f"{result.check['samples']} samples of {result.check['dataset']}"
    )
    return figure


def save_sweep_plot(result: SweepResult, path: Union[str, Path]) -> Path:
    """Render the sweep figure to a PNG at `path`, atomically."""
    return _save(sweep_figure(result), path)


def save_compare_plot(result: CompareResult, path: Union[str, Path]) -> Path:
    """Render the comparison figure to a PNG at `path`, atomically."""
    return _save(compare_figure(result), path)


def _save(figure: Figure, path: Union[str, Path]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return Path(path)


def _panel(
    axes: Axes,
    points: Sequence[MeasuredPoint],
    x_of: Callable[[MeasuredPoint], Optional[float]],
    result: SweepResult,
) -> None:
    """Points of each kind, GDWS targets joined in order, every point labelled."""
    for kind, (name, marker, colour, size, offset) in STYLES.items():
        chosen = [p for p in points if p.kind == kind and x_of(p) is not None]
        if not chosen:
            continue
        xs = [x_of(p) for p in chosen]
        ys = [100 * p.robust_acc for p in chosen]
        if kind == "target":
            axes.plot(xs, ys, color=colour, linewidth=1, alpha=0.6)
            name = f"GDWS ({result.allocation})"
        axes.scatter(xs, ys, marker=marker, color=colour, s=size, label=name, zorder=3)
        for point, x, y in zip(chosen, xs, ys):
            axes.annotate(
                point.label, (x, y), textcoords="offset points", xytext=offset, fontsize=8
            )
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=8)


def _attack_text(result: Union[SweepResult, CompareResult]) -> str:
    attacks = result.check["attacks"]
    return ", ".join(f"{a['name']} eps {a['eps']:.3g} ({a['steps']} steps)" for a in attacks)
