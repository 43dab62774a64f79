"""Each layer's seconds in each form, measured inside the whole model.

A layer timed alone mispredicts its time in the network (-50..+150 % measured here: caches,
layout conversions between neighbours), so every candidate form is timed where it runs:
the whole model is lowered with every layer in that form, run under the backend's per-node
profiler, and each profiled node is charged to the layer it came from: by its name, or its
output's, less the suffixes the backend adds. The per-channel ops and residual Adds that
follow a layer's conv (and that backends fuse into it) are charged to the layer in every
form alike. What no layer owns (stem, shortcuts, pooling, head) is the model's fixed time.
"""

from __future__ import annotations

import collections
import hashlib
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import onnx

from gdws_deploy.ir.analyze import AnalyzedModel
from gdws_deploy.ir.graph import ConvLayer
from gdws_deploy.passes.gdws.compression import GdwsPass, option
from gdws_deploy.passes.gdws.decompose import ChannelSpectra, uniform
from gdws_deploy.passes.gdws.lowering import ELEMENTWISE
from gdws_deploy.speed.backends import Backend
from gdws_deploy.speed.cost_model import model_input_shape
from gdws_deploy.speed.tune_cache import TuneCache

# Per inference: profiled runs whose median is kept.
PROFILE_RUNS = 10
# Name suffixes of the nodes onnxruntime's layout pass creates (NCHWc convs, BN as conv).
_BACKEND_SUFFIXES = ("_nchwc", "_bn")
# Ops that follow a layer's conv and that backends fuse into it.
_FOLLOWERS = ELEMENTWISE | {"BatchNormalization", "Add"}
FIXED = "(fixed)"
# Seconds below this are taken as this: a cache keeps positive times only.
_FLOOR = 1e-9


@dataclass(frozen=True)
class OptionForm:
    """Every layer with `per_channel` kernels on each channel, in `lowering` (0: dense)."""

    lowering: str
    per_channel: int = 0

    def key(self) -> str:
        return "dense" if self.per_channel == 0 else f"{self.lowering} m={self.per_channel}"


class ContextTimer:
    """Times forms of a model's layers in that model, on one backend at one batch size."""

    def __init__(
        self,
        backend: Backend,
        batch: int,
        analyzed: AnalyzedModel,
        layers: Sequence[ConvLayer],
        spectra: Mapping[str, ChannelSpectra],
        cache: Optional[TuneCache] = None,
    ) -> None:
        self.backend, self.batch = backend, batch
        self.analyzed, self.layers, self.spectra = analyzed, layers, spectra
        self.model = analyzed.model
        self.cache = cache if cache is not None else TuneCache()
        self.digest = hashlib.sha1(self.model.SerializeToString()).hexdigest()[:16]

    def seconds(self, form: OptionForm) -> Dict[str, float]:
        """Seconds per inference of every layer (by name) in `form`, and FIXED's; layers
        whose form would not save MACs stay dense and are left out."""
        self.measure([form])
        return {name: self.cache.get(key) for name, key in self._keys(form).items()}

    def measure(self, forms: Sequence[OptionForm]) -> None:
        """Profile the forms not in the cache yet, together: their models run in turn, so
        the machine's drifts fall on all of them alike and their times compare."""
        missing = [
            form
            for form in forms
            if any(self.cache.get(key) is None for key in self._keys(form).values())
        ]
        if not missing:
            return
        models = [self.lowered(form) for form in missing]
        shape = model_input_shape(models[0], self.batch)
        profiles = self.backend.node_seconds(
            [model.SerializeToString() for model in models], shape, PROFILE_RUNS
        )
        layer_names = [layer.name for layer in self.layers]
        for form, model, profiled in zip(missing, models, profiles):
            charged = charge(profiled, owners(model, layer_names))
            for name, key in self._keys(form).items():
                self.cache.put(key, max(charged.get(name, 0.0), _FLOOR))

    def lowered(self, form: OptionForm) -> onnx.ModelProto:
        """The model with every layer that saves MACs in `form`."""
        if form.per_channel == 0:
            return self.model
        names = set(self._names(form))
        chosen = {
            layer.index: option(
                layer, uniform(self.spectra[layer.name], form.per_channel), form.lowering
            )
            for layer in self.layers
            if layer.name in names
        }
        return GdwsPass().write(self.analyzed, chosen)

    def _names(self, form: OptionForm) -> list:
        if form.per_channel == 0:
            return [layer.name for layer in self.layers]
        return [layer.name for layer in self.layers if saves_macs(layer, form.per_channel)]

    def _keys(self, form: OptionForm) -> Dict[str, str]:
        """Cache key of each layer's (and FIXED's) seconds in `form`."""
        return {
            name: (
                f"{self.backend.name} | batch {self.batch} | model {self.digest} | "
                f"in context {form.key()} | {name}"
            )
            for name in [*self._names(form), FIXED]
        }


def uniform_macs(layer: ConvLayer, per_channel: int) -> int:
    """MACs of `layer` with `per_channel` kernels on every channel (at most its rank)."""
    out_channels, in_channels, kh, kw = layer.weight_shape
    return min(per_channel, kh * kw, out_channels) * in_channels * layer.kernel_macs


def saves_macs(layer: ConvLayer, per_channel: int) -> bool:
    """Does `per_channel` kernels on every channel cost fewer MACs than the dense conv?"""
    return uniform_macs(layer, per_channel) < layer.macs


def owners(model: onnx.ModelProto, layer_names: Sequence[str]) -> Dict[str, str]:
    """Layer of each node and tensor name that belongs to one: the layer's Conv or GDWS
    nodes (named `<conv>/gdws_...`) and their outputs, then the chain of per-channel ops
    and Adds that alone read what the layer wrote."""
    layers = set(layer_names)
    readers = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            readers[name].append(node)
    owner: Dict[str, str] = {}
    ends = []
    for node in model.graph.node:
        layer = node.name if node.name in layers else node.name.rsplit("/gdws_", 1)[0]
        if layer not in layers:
            continue
        owner[node.name] = layer
        owner.update((output, layer) for output in node.output)
        ends += [(output, layer) for output in node.output]
    for tensor, layer in ends:
        while len(readers[tensor]) == 1 and readers[tensor][0].op_type in _FOLLOWERS:
            follower = readers[tensor][0]
            if follower.name in owner:
                break
            owner[follower.name] = layer
            tensor = follower.output[0]
            owner[tensor] = layer
    return owner


def charge(profiled: Mapping[str, float], owner: Mapping[str, str]) -> Dict[str, float]:
    """Seconds per layer (and FIXED for the rest) from per-node seconds. A fused node of
    several ONNX nodes (TensorRT's 'a + b' and 'PWN(a, b)') shares its time among them."""
    charged: Dict[str, float] = collections.defaultdict(float)
    for name, seconds in profiled.items():
        parts = [name] if name in owner else _fused_parts(name)
        for part in parts:
            charged[owner.get(part) or owner.get(_strip(part), FIXED)] += seconds / len(parts)
    return dict(charged)


def _fused_parts(name: str) -> List[str]:
    """The ONNX node names in a backend's name for a fused node ('a + PWN(b, c)': a, b, c)."""
    parts = [part for part in re.split(r"\s\+\s|PWN\(|[(), ]+", name) if part]
    return parts or [name]


def _strip(name: str) -> str:
    for suffix in _BACKEND_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name
