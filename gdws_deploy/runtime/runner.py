"""One runner interface for every backend, so robustness is judged by the deployed runtime.

Like Polygraphy's runners: `activate()` loads lazily, `infer(batch)` maps a float32 NCHW
batch to float32 logits, `deactivate()` frees; the context manager does both ends.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from gdws_deploy.errors import GdwsError


class Runner(abc.ABC):
    """A loaded model that turns input batches into logits."""

    name = "runner"

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.deactivate()

    @abc.abstractmethod
    def activate(self) -> None:
        """Load the model and allocate what inference needs."""

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 -> (N, classes) float32."""

    @abc.abstractmethod
    def deactivate(self) -> None:
        """Release what `activate` took."""


# onnxruntime's names of the float input types a model may declare (a half-precision export)
_ORT_FLOATS = {"tensor(float16)": np.float16, "tensor(double)": np.float64}


class OrtRunner(Runner):
    """ONNX Runtime on the CPU (or any execution providers given); the batch is cast to the
    type the model's input declares, the logits to float32."""

    name = "ort"

    def __init__(
        self,
        model: Union[str, Path, bytes],
        providers: Optional[Sequence[str]] = None,
        threads: int = 0,
        profile_prefix: Optional[str] = None,
        spinning: bool = True,
    ) -> None:
        self.model = model
        # False: idle threads sleep at once. Several sessions taking turns (the stages of a
        # multi-exit model) otherwise burn the cores the running one needs.
        self.spinning = spinning
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.threads = threads
        self.profile_prefix = profile_prefix  # set: onnxruntime profiles every node run
        self.session = None

    def activate(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = self.profile_prefix
        source = self.model if isinstance(self.model, bytes) else str(self.model)
        try:
            self.session = ort.InferenceSession(source, options, providers=self.providers)
        except Exception as error:  # ORT raises its own opaque classes
            raise GdwsError(f"onnxruntime cannot load the model: {error}") from error
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.input_dtype = _ORT_FLOATS.get(first.type, np.float32)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise GdwsError("runner used before activate()")
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=self.input_dtype)}
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float32)

    def deactivate(self) -> None:
        self.session = None
