"""Static INT8 quantization of a float ONNX model into QDQ form with onnxruntime, and how far
the INT8 model's outputs land from the float model's.

Settings, chosen for the deployment target, TensorRT's explicit INT8 (QDQ import), which
onnxruntime runs on a CPU as well:
- activations QInt8, symmetric (zero point 0): TensorRT quantizes symmetrically only, zero
  point 0, signed int8. QUInt8 activations carry a zero point (128, or the calibrated
  minimum's), which TensorRT refuses.
- weights QInt8, symmetric, per output channel (axis 0 of a Conv weight), and kept float
  with a QuantizeLinear -> DequantizeLinear pair (AddQDQPairToWeight): TensorRT 8.x (the
  Xavier's 8.5) quantizes Q/DQ weights itself and wants them in float (TensorRT 10 takes
  int8 weights too). onnxruntime folds the weight's QuantizeLinear when it loads the model,
  so the CPU runs the same int8 kernels; the file keeps float weights, so it is no smaller.
- bias left float (QuantizeBias off): an int32 bias needs an int32 DequantizeLinear, which
  TensorRT's parser rejects (Q/DQ are 8-bit or narrower there); onnxruntime still fuses a
  Conv with a float bias into its int8 QLinearConv.
- MinMax calibration: every calibration input's activations lie inside their ranges, so
  none saturates on the data the ranges came from.
Before quantizing, onnxruntime's pre-processing runs its shape inference (symbolic and
ONNX), so every activation has a known type (the quantizer leaves a tensor of unknown type
in float), but not its graph optimizer: the graph the pass wrote, in the forms it chose
and timed, is the graph that gets quantized.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from gdws_deploy.errors import GdwsError

# The opset a QDQ model with per-channel weights needs (DequantizeLinear's axis).
QDQ_OPSET = 13
# Samples per calibration run (the calibrator keeps only each tensor's min and max per run).
CALIBRATION_BATCH = 16
# Ops that mean a model is quantized already.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
    }
)
_EXTRA_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "AddQDQPairToWeight": True,
    "QuantizeBias": False,
}


@dataclass(frozen=True)
class Int8Deviation:
    """The INT8 model against the float original, both in onnxruntime, on the calibration
    samples: the largest output deviation, that over the largest |output| of the float
    model, and the share of samples whose top-1 class agrees (the worst output's)."""

    samples: int
    max_abs: float
    relative: float
    top1_agreement: float


def quantized_op(model: onnx.ModelProto) -> Optional[str]:
    """The first op that shows `model` is quantized already (None for a float model)."""
    return next((node.op_type for node in model.graph.node if node.op_type in QUANTIZED_OPS), None)


def check_quantizable(model: onnx.ModelProto, samples: object) -> np.ndarray:
    """`samples` as float32 batches (N, ...) of the model's one float32 input; GdwsError in
    one line for a model quantized already, another input than one float32 tensor, or
    samples that do not fit it."""
    op = quantized_op(model)
    if op is not None:
        raise GdwsError(f"the model is quantized already ({op} nodes): INT8 takes a float model")
    inputs = _data_inputs(model)
    if len(inputs) != 1:
        raise GdwsError(f"INT8 calibration feeds one input; the model has {len(inputs)}")
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
        raise GdwsError(f"INT8 quantization takes a float32 model; its input is {kind}")
    if not isinstance(samples, np.ndarray) or samples.dtype.kind != "f":
        raise GdwsError("INT8 calibration samples must be a float array (N, ...) of model inputs")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if samples.ndim != len(dims) or len(samples) == 0:
        raise GdwsError(
            f"INT8 calibration samples have shape {samples.shape}; the model takes "
            f"{len(dims)}-D batches, and at least one sample is needed"
        )
    wrong = [i for i, d in enumerate(dims[1:], 1) if d is not None and d != samples.shape[i]]
    if wrong or (dims[0] is not None and len(samples) < dims[0]):
        shown = "x".join("?" if d is None else str(d) for d in dims)
        raise GdwsError(
            f"INT8 calibration samples of shape {samples.shape} do not fit the input {shown}"
        )
    if not np.all(np.isfinite(samples)):
        raise GdwsError("INT8 calibration samples hold NaN or infinite values")
    return np.ascontiguousarray(samples, dtype=np.float32)


def quantize(model: onnx.ModelProto, samples: np.ndarray) -> onnx.ModelProto:
    """`model` quantized to INT8 in QDQ form (see the module's docstring for the settings),
    its activation ranges calibrated on `samples` (N, ...) of its input. The model comes
    back in memory; onnxruntime's temporary files live in a temporary folder."""
    samples = check_quantizable(model, samples)
    feed = _Feed(_data_inputs(model)[0].name, _batches(model, samples))
    with tempfile.TemporaryDirectory(prefix="gdws-int8-") as folder:
        prepared, output = Path(folder, "prepared.onnx"), Path(folder, "int8.onnx")
        try:
            quant_pre_process(_at_qdq_opset(model), prepared, skip_optimization=True)
            quantize_static(
                prepared,
                output,
                feed,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options=_EXTRA_OPTIONS,
            )
        except Exception as error:  # onnxruntime's quantizer raises assorted classes
            why = _first_line(error)
            raise GdwsError(f"onnxruntime cannot quantize the model: {why}") from error
        return onnx.load(str(output))


def int8_deviation(
    original: onnx.ModelProto, quantized: onnx.ModelProto, samples: np.ndarray
) -> Int8Deviation:
    """How far `quantized`'s outputs are from `original`'s on `samples`, both run by
    onnxruntime as deployed (graph optimizations on: the INT8 model runs int8 kernels)."""
    samples = check_quantizable(original, samples)
    batches = _batches(original, samples)
    expected, actual = _outputs(original, batches), _outputs(quantized, batches)
    worst, largest, agreement = 0.0, 0.0, 1.0
    for a, b in zip(expected, actual):
        a, b = a.astype(np.float64), b.astype(np.float64)
        worst = max(worst, float(np.max(np.abs(a - b))))
        largest = max(largest, float(np.max(np.abs(a))))
        top = a.reshape(len(a), -1).argmax(1) == b.reshape(len(b), -1).argmax(1)
        agreement = min(agreement, float(np.mean(top)))
    count = sum(len(batch) for batch in batches)
    return Int8Deviation(count, worst, worst / largest if largest > 0 else worst, agreement)


class _Feed(CalibrationDataReader):
    """The calibration batches, one {input name: batch} per get_next, then None."""

    def __init__(self, name: str, batches: Sequence[np.ndarray]) -> None:
        self._batches: Iterator[Dict[str, np.ndarray]] = iter([{name: b} for b in batches])

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._batches, None)


def _data_inputs(model: onnx.ModelProto) -> List[onnx.ValueInfoProto]:
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _batches(model: onnx.ModelProto, samples: np.ndarray) -> List[np.ndarray]:
    """The samples in runs of CALIBRATION_BATCH, or of the model's fixed batch (a remainder
    that fills no fixed batch is left out)."""
    first = _data_inputs(model)[0].type.tensor_type.shape.dim[0]
    size = first.dim_value if first.HasField("dim_value") else CALIBRATION_BATCH
    whole = len(samples) - (len(samples) % size if first.HasField("dim_value") else 0)
    return [samples[start : start + size] for start in range(0, whole, size)]


def _at_qdq_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` at opset 13 at least: per-channel DequantizeLinear takes an axis from there."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset >= QDQ_OPSET:
        return model
    from onnx import version_converter

    return version_converter.convert_version(model, QDQ_OPSET)


def _outputs(model: onnx.ModelProto, batches: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Every output of `model` over all batches, stacked; onnxruntime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name
        runs = [session.run(None, {name: batch}) for batch in batches]
    except Exception as error:  # ORT raises its own classes, none of them exported
        raise GdwsError(f"onnxruntime cannot run the model: {_first_line(error)}") from error
    return [np.concatenate(parts) for parts in zip(*runs)]


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
