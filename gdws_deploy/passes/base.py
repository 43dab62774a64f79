"""What a compression method is to the pipeline: the CompressionPass interface.

A pass says what a layer can become and how to write it, nothing more: which of the
selected Convs it can take (and why not), what each layer becomes for a target (its
error, MACs and form: a LayerOption), and how to write chosen options into the graph.
Which form is fastest is speed/'s to decide, what the result costs in robustness is
robustness/'s, and pipeline/convert.py runs the steps in order (analyze -> select ->
prepare -> plan -> forms -> write -> verify -> parity -> report).

An abstract base class rather than a typing.Protocol: `select` and `nothing_eligible` are
the same for every pass (the precedence of skip reasons, the wording of "nothing to do")
and belong in one place, which a Protocol cannot hold; a pass states its kinship by
subclassing, and a missing method fails when the pass is made, not mid-conversion.
"""

from __future__ import annotations

import abc
import fnmatch
from collections import Counter
from dataclasses import dataclass, replace
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ClassVar,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import onnx
from onnx import TensorProto

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.analyze import AnalyzedModel
from gdws_deploy.ir.graph import ConvLayer

if TYPE_CHECKING:
    from gdws_deploy.options import ConvertOptions

# progress(done, total, layer name), called as a pass prepares each layer.
Progress = Callable[[int, int, str], None]
# stage(what starts now), for steps that take seconds.
Stage = Callable[[str], None]
# Skip reasons of Convs whose weights are not constants (ir.graph.find_convs).
RUN_TIME_WEIGHTS = ("weight is a graph input", "weight computed at run time", "quantized weight")
# Conv weight types a pass computes on (numpy float types: the math runs in float64).
FLOAT_WEIGHTS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
# Conv names an error message lists at most.
_NAMES_SHOWN = 5


@dataclass(frozen=True)
class LayerOption:
    """One thing a layer can become.

    factors: what the pass writes (GdwsFactors for GDWS); macs: the layer's MACs in this
    form at batch 1; error: on the pass's scale (GDWS: the weighted squared error);
    size: what the report counts (kernels, rank); form: how it is written, a name the
    pass's `write` knows ("" until a form is chosen).
    """

    factors: Any
    macs: int
    error: float
    size: int
    form: str = ""


class CompressionPass(abc.ABC):
    """A compression method the pipeline can run on a model's Convs.

    name: the registry key (ConvertOptions.method); label: how messages name it. Forms
    (lowerings, tuning, speed goals) are speed/'s and exist for GDWS factors only: the
    pipeline refuses them for any other pass.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    # Skip-reason prefixes of Convs the method has nothing to do in, and what to say when
    # every Conv is one.
    structural: ClassVar[Tuple[str, ...]] = ()
    nothing_to_do: ClassVar[str] = ""
    # Whether data calibrates it (loss curves, alphas: robustness.sensitivity.calibrate).
    calibrates: ClassVar[bool] = False

    @abc.abstractmethod
    def why_not(self, layer: ConvLayer) -> Optional[str]:
        """Why this Conv with a constant weight is nothing the pass can rewrite; None if it is."""

    def cannot_shrink(self, layer: ConvLayer) -> Optional[str]:
        """Why an eligible layer has no form with fewer MACs; None when it may have one."""
        return None

    def prepare(
        self,
        analyzed: AnalyzedModel,
        options: ConvertOptions,
        *,
        progress: Optional[Progress] = None,
        stage: Optional[Stage] = None,
    ) -> ConvertOptions:
        """Check `options` against the eligible layers and precompute what plans reuse;
        the options plan() and write() are then given (by default `options` itself)."""
        return options

    @abc.abstractmethod
    def plan(
        self, analyzed: AnalyzedModel, layers: Sequence[ConvLayer], options: ConvertOptions
    ) -> Dict[int, LayerOption]:
        """What each of `layers` becomes for the options' target, by node index; layers
        left out stay dense. Only layers whose option has fewer MACs are planned."""

    @abc.abstractmethod
    def write(self, analyzed: AnalyzedModel, chosen: Mapping[int, LayerOption]) -> onnx.ModelProto:
        """The model with each chosen layer (by node index) written in its option's form."""

    def select(self, analyzed: AnalyzedModel) -> AnalyzedModel:
        """`analyzed` with the pass's own skip reasons: they come before the selection's
        and shape inference's (a grouped first conv is a grouped conv), after a weight
        that is no constant."""
        convs = []
        for layer in analyzed.convs:
            reason = None if layer.weight_type is None else self.why_not(layer)
            convs.append(layer if reason is None else replace(layer, skipped=reason, weight=None))
        return replace(analyzed, convs=tuple(convs))

    def nothing_eligible(
        self, convs: Sequence[ConvLayer], include: Sequence[str] = ()
    ) -> GdwsError:
        """Why no target could rewrite anything, in one line."""
        if not convs:
            return GdwsError(f"the model has no Conv: nothing for {self.label} to do")
        names = [layer.name for layer in convs]
        if include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in include):
            shown = ", ".join(names[:_NAMES_SHOWN]) + (", ..." if len(names) > _NAMES_SHOWN else "")
            return GdwsError(f"--include matched no Conv (names are: {shown})")
        kinds = Counter(layer.skipped.split(" (")[0] for layer in convs)
        counted = ", ".join(f"{count} x {kind}" for kind, count in kinds.most_common())
        if self.structural and all(kind.startswith(self.structural) for kind in kinds):
            return GdwsError(self.nothing_to_do)
        if all(kind.startswith(RUN_TIME_WEIGHTS) for kind in kinds):
            return GdwsError(
                f"no Conv has constant weights ({counted}): nothing {self.label} can factor"
            )
        hint = "; --all-layers converts the first" if "first conv" in kinds else ""
        return GdwsError(f"no Conv {self.label} can rewrite ({counted}){hint}")


def without_gdws_settings(
    options: ConvertOptions, method: str, takes: str, allocation: str, rule: str
) -> ConvertOptions:
    """`options` with the pass's own MAC allocation (`allocation`, described as `rule`);
    GdwsError for what only GDWS reads: per-layer targets, alphas, loss curves, another
    allocation rule. `takes`: the targets the pass takes, as the message names them."""
    for name in ("beta", "budget"):
        if getattr(options, name) is not None:
            raise GdwsError(f"method {method!r} takes {takes}, not {name}")
    if options.alphas is not None or options.loss_curves is not None:
        raise GdwsError(
            f"alphas and loss curves weight GDWS kernels: method {method!r} takes neither"
        )
    if options.allocation not in ("auto", allocation):
        raise GdwsError(
            f"method {method!r} shares a MAC target by {rule} (allocation {allocation!r}), "
            f"not {options.allocation!r}"
        )
    return replace(options, allocation=allocation)


def chosen_factors(
    analyzed: AnalyzedModel, chosen: Mapping[int, LayerOption]
) -> List[Tuple[ConvLayer, Any]]:
    """(layer, factors) of each chosen layer, in graph order: what a pass's rewrite takes."""
    return [
        (layer, chosen[layer.index].factors) for layer in analyzed.convs if layer.index in chosen
    ]
