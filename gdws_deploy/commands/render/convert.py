"""convert's layer table and totals, and its warnings on stderr."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# What a method other than GDWS writes in place of a Conv, for the untimed warning.
_WRITTEN = {
    "gkp": "grouped convs between Gathers",
    "atmc": "each factored conv as a kxk conv of r filters then a 1x1 conv",
}

if TYPE_CHECKING:
    from gdws_deploy.options import ConvertOptions
    from gdws_deploy.pipeline.convert import ConvertReport


def layer_table(report: ConvertReport) -> Table:
    """One row per Conv: kernels and MACs, or why it was left alone (GKP: G is the
    kernels each filter group keeps, the error their pruned energy)."""
    from gdws_deploy.passes.registry import pass_named

    label = pass_named(report.method).label
    table = Table(title=f"{label} conversion ({report.target})", title_justify="left")
    table.add_column("Conv")
    for column in ("weight", "G", "MACs before -> after"):
        table.add_column(column, justify="right")
    table.add_column("lowering")
    table.add_column("speed-up", justify="right")
    table.add_column("weighted error (or why left dense)")
    for layer in report.layers:
        name, shape = escape(layer.name), "x".join(str(d) for d in layer.weight_shape)
        lowering = layer.lowering or "-"
        speedup = _speedup(layer.speedup)
        if layer.kernels is None:
            why = f"[dim]{escape(layer.skipped or '')}[/]"
            table.add_row(name, shape, "-", _macs(layer.macs_before), lowering, speedup, why)
            continue
        macs = f"{_macs(layer.macs_before)} -> {_macs(layer.macs_after)}"
        row = (str(layer.kernels), macs, lowering, speedup, f"{layer.error:.4g}")
        table.add_row(name, shape, *row)
    return table


def totals(report: ConvertReport) -> str:
    """MACs before and after, Convs rewritten, parity, and the measured speed-up if tuned."""
    parity = "not checked" if report.parity is None else f"{report.parity:.3g}"
    text = (
        f"total MACs {_macs(report.macs_before)} -> {_macs(report.macs_after)} "
        f"({report.reduction:.2f}x fewer), {report.converted} Conv(s) rewritten, "
        f"parity (max relative output deviation vs MODEL in onnxruntime) {parity}"
    )
    if report.measured_speedup is not None:
        text += f"\nmeasured {report.measured_speedup:.2f}x faster than MODEL on {report.tuned}"
    if report.int8:
        text += "\n" + _int8(report)
    if report.size_bits_before is not None and report.size_bits_after is not None:
        text += (
            f"\nweights {_bytes(report.size_bits_before)} -> {_bytes(report.size_bits_after)} "
            "as ATMC counts them (non-zeros x bits)"
        )
    return text


def warnings(
    report: ConvertReport, options: ConvertOptions, rewritten: bool, errors: Console
) -> None:
    """The report's notes, then a warning where outputs moved far from MODEL's or where a
    tuned model measured short of its speed goal; one stderr line each."""
    from gdws_deploy.ir.parity import PARITY_WARNING
    from gdws_deploy.speed.goals import SpeedGoal

    for note in report.notes:
        errors.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    if report.parity is not None and report.parity > PARITY_WARNING:
        errors.print(
            f"[yellow]warning:[/] outputs deviate from MODEL's by {report.parity:.3g} of their "
            f"range (over {PARITY_WARNING:g}): check accuracy with gdws-deploy eval",
            soft_wrap=True,
        )
    if rewritten and options.method != "gdws":
        errors.print(
            f"[yellow]warning:[/] untimed: method {options.method} wrote "
            f"{_WRITTEN.get(options.method, 'new convs')}, which may run slower than MODEL; "
            "measure both with gdws-deploy bench",
            soft_wrap=True,
        )
    if rewritten and options.sparsity:
        errors.print(
            "note: the sparse residual is a second Conv with mostly zero weights: onnxruntime "
            "and TensorRT 8.5 (Xavier) compute it dense, so it saves model size, not time "
            "(the MACs count it in full)",
            markup=False,
            soft_wrap=True,
        )
    if rewritten and options.bits is not None:
        errors.print(
            f"note: weight sharing left at most {2**options.bits} values per factor, stored as "
            "float weights (the graph stays float); the size counts at most "
            f"{options.bits} bits per weight, plus the shared values",
            markup=False,
            soft_wrap=True,
        )
    elif rewritten and options.tune is None:
        errors.print(
            "[yellow]warning:[/] untuned: the GDWS layers were lowered by rule for no backend "
            "and may run slower than MODEL; --tune ort (onnxruntime) or --tune trt (TensorRT, "
            "on the device) times each layer where it will run and never writes a slower model",
            soft_wrap=True,
        )
    if not (options.has_speed_goal and rewritten):
        return
    wanted = SpeedGoal(options.speedup, options.speed_ratio).wanted(report.reduction)
    if report.measured_speedup < wanted:
        errors.print(
            f"[yellow]warning:[/] measured {report.measured_speedup:.2f}x, short of the "
            f"{wanted:.2f}x asked (layer times measured in the whole model add up only roughly)",
            soft_wrap=True,
        )


def _bytes(bits: int) -> str:
    return f"{_macs(bits // 8)}B"


def _int8(report: ConvertReport) -> str:
    """What INT8 quantization moved: the logits against MODEL's on the calibration data."""
    deviation = report.int8_deviation
    if deviation is None:
        return "quantized to INT8 (QDQ); its deviation from MODEL not checked"
    return (
        f"quantized to INT8 (QDQ): logits within {deviation.max_abs:.3g} of MODEL's "
        f"({deviation.relative:.3g} of their largest), top-1 agreement "
        f"{deviation.top1_agreement:.1%} on {deviation.samples} calibration samples"
    )


def _speedup(speedup: Optional[float]) -> str:
    """A layer's dense / GDWS time; the cost model floors a form at 1% of dense."""
    from gdws_deploy.speed.cost_model import MIN_SHARE

    if speedup is None:
        return "-"
    return f"{speedup:.2f}x" if speedup < 1 / MIN_SHARE else f">={1 / MIN_SHARE:.0f}x"


def _macs(count: int) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)
