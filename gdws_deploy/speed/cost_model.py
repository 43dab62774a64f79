"""What a layer costs in each form, calibrated by timing single-layer models on a backend.

A layer's time in a GDWS form grows with its kernel count G (gather, fold) or with the
kernels per channel m (pad). Each form is timed at a few calibration points, as small
ONNX models built by the real lowerings (random weights; the layer between a 1x1 conv
and a pool, as inside a network), at the deployment batch size, and interpolated
piecewise linearly in between. So one calibration of a layer shape serves every kernel
count: every layer of that shape and every target. Measurements are cached by backend,
batch, layer shape and point (measure.py times them, tune_cache.py keeps them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gdws_deploy.errors import GdwsError
from gdws_deploy.ir.graph import ConvLayer, TensorType, check_and_infer
from gdws_deploy.passes.gdws.decompose import GdwsFactors
from gdws_deploy.passes.gdws.lowering import ALIGNED_LOWERINGS
from gdws_deploy.passes.gdws.rewrite import rewrite
from gdws_deploy.speed.backends import Backend, Shape, Timing, time_models
from gdws_deploy.speed.tune_cache import TuneCache

# Layers: the fastest query, as other processes only ever slow a query down.
LAYER_TIMING = Timing(rounds=3, queries=6, seconds=0.1, warmup_ms=10.0, statistic="min")
# The whole-model comparison: fewer, longer queries than a single layer's.
MODEL_TIMING = Timing(rounds=4, queries=4, seconds=1.0, warmup_ms=50.0)
# The least share of its dense time a layer's form is taken to cost.
MIN_SHARE = 0.01
_SPATIAL = ("strides", "pads", "auto_pad", "dilations")
# Forms whose time grows with the kernels of the fullest channel (one slice per rank).
SLICED = ("pad", "sum")
_OPSET = 17


@dataclass(frozen=True)
class LayerShape:
    """What a layer's time depends on: its conv's channels, kernel, image and attributes."""

    in_channels: int
    out_channels: int
    kernel: Tuple[int, int]
    image: Tuple[int, int]
    spatial: Tuple[Tuple[str, object], ...]
    bias: bool
    elem_type: int

    @classmethod
    def of(cls, node: onnx.NodeProto, types: Mapping[str, TensorType]) -> LayerShape:
        """The shape of Conv `node`; GdwsError when its image size is not fixed."""
        weight = types[node.input[1]].shape
        image = types[node.input[0]].shape[2:]
        if not all(isinstance(d, int) for d in image):
            raise GdwsError(
                f"tuning needs fixed image sizes; Conv {node.name!r} sees {image} "
                "(export the model with a fixed height and width)"
            )
        spatial = tuple(
            (attr.name, _hashable(helper.get_attribute_value(attr)))
            for attr in node.attribute
            if attr.name in _SPATIAL
        )
        return cls(
            in_channels=weight[1],
            out_channels=weight[0],
            kernel=tuple(weight[2:]),
            image=tuple(image),
            spatial=tuple(sorted(spatial)),
            bias=len(node.input) > 2 and bool(node.input[2]),
            elem_type=types[node.input[1]].elem_type,
        )

    def key(self) -> str:
        attrs = " ".join(f"{name}={_text(value)}" for name, value in self.spatial)
        dtype = onnx.TensorProto.DataType.Name(self.elem_type).lower()
        return (
            f"conv {self.out_channels}x{self.in_channels}x{self.kernel[0]}x{self.kernel[1]} "
            f"on {self.image[0]}x{self.image[1]} {attrs} bias={int(self.bias)} {dtype}"
        )


@dataclass(frozen=True)
class LoweringForm:
    """A layer in one lowering: G kernels, at most `most` on one channel."""

    lowering: str
    kernels: int = 0
    most: int = 0

    def key(self) -> str:
        if self.lowering == "dense":
            return "dense"
        return f"{self.lowering} G={self.kernels} m={self.most}"

    @property
    def size(self) -> int:
        """What the form's time grows with: slices for pad, kernels otherwise."""
        return self.most if self.lowering in SLICED else self.kernels


def calibration_forms(shape: LayerShape, lowering: str) -> Tuple[LoweringForm, ...]:
    """The points a form is timed at: G = 1, C, 4C (fold: 1, C; pad, sum: 1, 2, 4 slices).

    Gather points keep one channel over the rest so a Gather is really emitted.
    """
    c = shape.in_channels
    if lowering in SLICED:
        return tuple(LoweringForm(lowering, m * c, m) for m in (1, 2, 4))
    if lowering == "fold":
        return (LoweringForm("fold", 1, 1), LoweringForm("fold", c, 1))
    return tuple(LoweringForm("gather", g, g // c + 1) for g in (1, c, 4 * c))


class CostModel:
    """Seconds per inference of layers in any form, on one backend at one batch size."""

    def __init__(
        self,
        backend: Backend,
        batch: int = 1,
        cache: Optional[TuneCache] = None,
        timing: Timing = LAYER_TIMING,
    ) -> None:
        if int(batch) != batch or batch < 1:
            raise GdwsError(f"tune batch must be a whole number >= 1, got {batch}")
        self.backend = backend
        self.batch = int(batch)
        self.cache = cache if cache is not None else TuneCache()
        self.timing = timing

    def describe(self) -> str:
        return f"{self.backend.name}, batch {self.batch}"

    def key(self, shape: LayerShape, form: LoweringForm) -> str:
        return f"{self.backend.name} | batch {self.batch} | {shape.key()} | {form.key()}"

    def calibrate(self, shape: LayerShape, lowerings: Sequence[str]) -> None:
        """Time what is not cached yet of dense and these forms' points, interleaved."""
        points = [LoweringForm("context"), LoweringForm("dense")]
        for lowering in dict.fromkeys(lowerings):
            if lowering != "dense":
                points += calibration_forms(shape, lowering)
        missing = [form for form in points if self.cache.get(self.key(shape, form)) is None]
        if not missing:
            return
        models = [candidate_model(shape, form, self.batch) for form in missing]
        for form, seconds in zip(missing, time_models(self.backend, models, self.timing)):
            self.cache.put(self.key(shape, form), seconds)

    def seconds(self, shape: LayerShape, form: LoweringForm) -> float:
        """The layer's time in `form`: interpolated between its calibration points, past
        the last one extrapolated along the last segment (never downwards)."""
        self.calibrate(shape, (form.lowering,))
        if form.lowering == "dense":
            return self._layer_seconds(shape, form)
        points = calibration_forms(shape, form.lowering)
        xs = np.array([point.size for point in points], dtype=np.float64)
        ys = np.array([self._layer_seconds(shape, point) for point in points])
        if form.size <= xs[-1]:
            return float(np.interp(form.size, xs, ys))
        slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
        return float(ys[-1] + slope * (form.size - xs[-1]))

    def _layer_seconds(self, shape: LayerShape, form: LoweringForm) -> float:
        """A calibrated point's time less its context's.

        Noise, or a fold sparing its producer more work than the layer costs, can take
        that to zero or below: a form counts as at least MIN_SHARE of the dense layer.
        """
        context = self.cache.get(self.key(shape, LoweringForm("context")))
        dense = max(self.cache.get(self.key(shape, LoweringForm("dense"))) - context, context / 100)
        if form.lowering == "dense":
            return dense
        return max(self.cache.get(self.key(shape, form)) - context, dense * MIN_SHARE)

    def compare(self, original: onnx.ModelProto, converted: onnx.ModelProto) -> Tuple[float, float]:
        """Seconds per inference of both whole models, timed interleaved."""
        shape = model_input_shape(original, self.batch)
        pair = [(model.SerializeToString(), shape) for model in (original, converted)]
        before, after = time_models(self.backend, pair, MODEL_TIMING)
        return before, after


def model_input_shape(model: onnx.ModelProto, batch: int) -> Shape:
    """The one input's shape at `batch`; GdwsError for other inputs or unfixed dims."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [info for info in model.graph.input if info.name not in initializers]
    if len(inputs) != 1:
        raise GdwsError(f"tuning needs a model with one input, this one has {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value != batch:
        raise GdwsError(
            f"tune batch {batch}: the model's batch is fixed at {dims[0].dim_value}; "
            "tune at that batch or export with a dynamic batch"
        )
    rest = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
    if None in rest:
        raise GdwsError("tuning needs fixed input dimensions besides the batch")
    return (batch, *rest)


def candidate_model(shape: LayerShape, form: LoweringForm, batch: int) -> Tuple[bytes, Shape]:
    """A model of the layer in `form` between a 1x1 conv and a 1x1 pool (random
    weights), and its input shape.

    The context keeps the backend's own layout around the layer, as inside a network
    (onnxruntime would otherwise time layout conversions at the model's ends as part of
    the layer), and its conv is a real producer for a fold. LoweringForm("context") is the conv
    and the pool alone (with the layer's stride): its time is taken off every form's.
    """
    model, types = _layer_in_context(shape, batch, context_only=form.lowering == "context")
    input_shape = (batch, shape.in_channels, *shape.image)
    if form.lowering in ("dense", "context"):
        return model.SerializeToString(), input_shape
    layer = ConvLayer(1, "conv", (shape.out_channels, shape.in_channels, *shape.kernel), 0)
    factors = _spread_factors(shape, form)
    lowered = rewrite(model, [(layer, factors)], types, ALIGNED_LOWERINGS[form.lowering])
    return lowered.SerializeToString(), input_shape


def _layer_in_context(
    shape: LayerShape, batch: int, context_only: bool
) -> Tuple[onnx.ModelProto, Dict[str, TensorType]]:
    """x -> 1x1 conv (C -> C) -> the layer's Conv -> 1x1 MaxPool -> y, seeded random
    weights. The pool keeps the layer's output in the backend's layout at little cost;
    context_only: the layer left out, the pool taking its stride.
    """
    rng = np.random.default_rng(0)
    dtype = helper.tensor_dtype_to_np_dtype(shape.elem_type)
    c, m = shape.in_channels, shape.out_channels
    tensors = [numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(dtype), "wp")]
    nodes = [helper.make_node("Conv", ["x", "wp"], ["h"], name="prefix")]
    strides = [1, 1]
    if context_only:
        strides = list(dict(shape.spatial).get("strides", strides))
    else:
        weight = rng.standard_normal((m, c, *shape.kernel)).astype(dtype)
        tensors.append(numpy_helper.from_array(weight, "w"))
        if shape.bias:
            tensors.append(numpy_helper.from_array(rng.standard_normal(m).astype(dtype), "b"))
        attrs = {name: list(v) if isinstance(v, tuple) else v for name, v in shape.spatial}
        inputs = ["h", "w", "b"] if shape.bias else ["h", "w"]
        nodes.append(
            helper.make_node(
                "Conv", inputs, ["z"], name="conv", kernel_shape=list(shape.kernel), **attrs
            )
        )
    source = "h" if context_only else "z"
    nodes.append(helper.make_node("MaxPool", [source], ["y"], kernel_shape=[1, 1], strides=strides))
    x = helper.make_tensor_value_info("x", shape.elem_type, [batch, c, *shape.image])
    y = helper.make_tensor_value_info("y", shape.elem_type, [None] * 4)
    graph = helper.make_graph(nodes, "layer", [x], [y], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8
    return model, check_and_infer(model)


def _spread_factors(shape: LayerShape, form: LoweringForm) -> GdwsFactors:
    """Random factors with G kernels: `most` on channel 0, the rest spread evenly."""
    c, g, most = shape.in_channels, form.kernels, min(form.most, form.kernels)
    rest = np.full(c - 1, (g - most) // max(c - 1, 1))
    rest[: (g - most) - rest.sum()] += 1
    channels = np.repeat(np.arange(c), np.concatenate([[most], rest]))
    rng = np.random.default_rng(1)
    dtype = helper.tensor_dtype_to_np_dtype(shape.elem_type)
    return GdwsFactors(
        channels=channels,
        depthwise=rng.standard_normal((g, *shape.kernel)).astype(dtype),
        pointwise=rng.standard_normal((shape.out_channels, g)).astype(dtype),
        error=0.0,
        in_channels=c,
    )


def _hashable(value):
    """An attribute value as LayerShape keeps it: ints as a tuple, text as str."""
    return value.decode() if isinstance(value, bytes) else tuple(value)


def _text(value) -> str:
    return "x".join(str(v) for v in value) if isinstance(value, tuple) else value
