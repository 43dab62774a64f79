"""Does the converted model compute what the original does? Ask onnxruntime.

Both models run on the same seeded random inputs of the model's input shapes; the
figure is the max relative output deviation, max|a - b| / max|a| over all outputs.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnx

from gdws_deploy.errors import GdwsError

# Symbolic dims run at these sizes: the leading (batch) one, and any other (an image side
# of a fully convolutional model, which 1 would make too small for its kernels).
PARITY_BATCH = 2
PARITY_OTHER = 32
# A deviation worth a warning: rewrites that keep accuracy move outputs by a few percent
# at most (the bundled model at 1.5x-2x fewer MACs: 0.009-0.017); past 5 % of the output's
# range, two scores within a tenth of that range of each other can swap places.
PARITY_WARNING = 0.05


def random_inputs(model: onnx.ModelProto, seed: int = 0, batch: int = PARITY_BATCH) -> Dict:
    """Seeded inputs for every graph input that is not an initializer.

    Float inputs are standard normal, others zeros; fixed dims are kept, the leading
    symbolic dim becomes `batch` and any other symbolic dim PARITY_OTHER.
    """
    rng = np.random.default_rng(seed)
    initializers = {tensor.name for tensor in model.graph.initializer}
    feeds = {}
    for info in model.graph.input:
        if info.name in initializers:
            continue
        tensor = info.type.tensor_type
        dims = [
            d.dim_value if d.HasField("dim_value") else (batch if i == 0 else PARITY_OTHER)
            for i, d in enumerate(tensor.shape.dim)
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[info.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[info.name] = np.zeros(dims, dtype=dtype)
    return feeds


def max_relative_deviation(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, seed: int = 0
) -> float:
    """max|a - b| / max|a| over all outputs of both models on the same random inputs."""
    feeds = random_inputs(reference, seed)
    expected = _run(reference, feeds, "the original model")
    actual = _run(candidate, feeds, "the converted model")
    worst = 0.0
    for a, b in zip(expected, actual):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        scale = np.max(np.abs(a)) if a.size else 0.0
        gap = np.max(np.abs(a - b)) if a.size else 0.0
        worst = max(worst, gap / scale if scale > 0 else gap)
    return float(worst)


def _run(model: onnx.ModelProto, feeds: Dict, label: str) -> List[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures surface as GdwsError
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        return session.run(None, feeds)
    except Exception as error:  # ORT raises its own classes, none of them exported
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GdwsError(
            f"onnxruntime cannot run {label} for the parity check ({first}); "
            "use --no-parity to skip it"
        ) from error
