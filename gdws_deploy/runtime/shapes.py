"""Input shapes as trtexec spells them (`input:1x3x32x32,mask:1x8`) and optimization profiles.

Pure Python: the build, the runners and the benchmark all check shapes here, so a shape a
profile cannot take fails with one clear line before any TensorRT call.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, NamedTuple, Optional, Sequence, Tuple

from gdws_deploy.errors import GdwsError

Shape = Tuple[int, ...]
PROFILE_FLAGS = ("--min-shapes", "--opt-shapes", "--max-shapes")


class Profile(NamedTuple):
    """The smallest, the tuned-for and the largest shape one input accepts."""

    min: Shape
    opt: Shape
    max: Shape


def format_shape(shape: Iterable[int]) -> str:
    text = "x".join(str(int(d)) for d in shape)
    return text or "scalar"


def parse_dims(text: str, option: str = "--shapes") -> Shape:
    """'1x3x32x32' -> (1, 3, 32, 32); every dimension a positive integer."""
    try:
        dims = tuple(int(part) for part in text.strip().lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise GdwsError(f"{option}: {text!r} is not a shape like 1x3x32x32 (positive integers)")
    return dims


def parse_shape_specs(text: Optional[str], option: str = "--shapes") -> Dict[str, Shape]:
    """'input:1x3x32x32,mask:1x8' -> {'input': (1, 3, 32, 32), 'mask': (1, 8)}.

    As in trtexec the name is everything before the last colon and may be quoted.
    """
    specs: Dict[str, Shape] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, colon, dims = item.strip().rpartition(":")
        name = name.strip().strip("'\"")
        if not colon or not name:
            raise GdwsError(f"{option}: {item.strip()!r} is not NAME:DIMS like input:1x3x32x32")
        if name in specs:
            raise GdwsError(f"{option}: input {name!r} is given twice")
        specs[name] = parse_dims(dims, option)
    return specs


def is_dynamic(shape: Sequence[int]) -> bool:
    return any(int(d) < 0 for d in shape)


def _check_fits(name: str, declared: Shape, shape: Shape, option: str) -> None:
    if len(shape) != len(declared):
        raise GdwsError(
            f"{option}: input {name!r} has rank {len(declared)} ({format_shape(declared)}), "
            f"got {format_shape(shape)}"
        )
    for axis, (want, got) in enumerate(zip(declared, shape)):
        if want >= 0 and want != got:
            raise GdwsError(
                f"{option}: input {name!r} has fixed size {want} on axis {axis}, "
                f"got {format_shape(shape)}"
            )


def resolve_profiles(
    inputs: Mapping[str, Shape],
    shapes: Mapping[str, Shape],
    min_shapes: Mapping[str, Shape],
    opt_shapes: Mapping[str, Shape],
    max_shapes: Mapping[str, Shape],
    batch: int = 1,
) -> Dict[str, Profile]:
    """One Profile per network input, following trtexec's rules.

    `inputs` maps each input to its declared shape (-1 for a dynamic axis). `--shapes` fixes
    min = opt = max; otherwise a missing opt comes from max or min and a missing min or max
    from opt. A dynamic input nobody sized gets 1 on every dynamic axis, as trtexec does
    (`batch` on a dynamic first axis, for `bench --batch` on an ONNX model).
    """
    given = {"--shapes": shapes, "--min-shapes": min_shapes}
    given.update({"--opt-shapes": opt_shapes, "--max-shapes": max_shapes})
    for option, specs in given.items():
        unknown = sorted(set(specs) - set(inputs))
        if unknown:
            raise GdwsError(
                f"{option}: no input named {unknown[0]!r}; the model's inputs are "
                + ", ".join(repr(n) for n in inputs)
            )
    if shapes and (min_shapes or opt_shapes or max_shapes):
        raise GdwsError("give either --shapes or --min-shapes/--opt-shapes/--max-shapes")
    profiles = {}
    for name, declared in inputs.items():
        declared = tuple(int(d) for d in declared)
        if name in shapes:
            low = opt = high = shapes[name]
        else:
            opt = opt_shapes.get(name) or max_shapes.get(name) or min_shapes.get(name)
            if opt is None:
                opt = tuple(d if d >= 0 else 1 for d in declared)
                if declared and declared[0] < 0:
                    opt = (batch, *opt[1:])
            low, high = min_shapes.get(name, opt), max_shapes.get(name, opt)
        labels = (
            ("--shapes",) * 3
            if name in shapes
            else ("--min-shapes", "--opt-shapes", "--max-shapes")
        )
        for option, shape in zip(labels, (low, opt, high)):
            _check_fits(name, declared, shape, option)
        if any(a > b for a, b in zip(low, opt)) or any(a > b for a, b in zip(opt, high)):
            raise GdwsError(
                f"input {name!r}: need min <= opt <= max on every axis, got min "
                f"{format_shape(low)}, opt {format_shape(opt)}, max {format_shape(high)}"
            )
        profiles[name] = Profile(tuple(low), tuple(opt), tuple(high))
    return profiles


def check_in_profile(name: str, shape: Sequence[int], profile: Profile) -> None:
    """Refuse a shape the engine was not built for (TensorRT would fail obscurely)."""
    shape = tuple(int(d) for d in shape)
    inside = len(shape) == len(profile.min) and all(
        lo <= d <= hi for d, lo, hi in zip(shape, profile.min, profile.max)
    )
    if not inside:
        raise GdwsError(
            f"input {name!r} of shape {format_shape(shape)} is outside the engine's profile "
            f"(min {format_shape(profile.min)}, max {format_shape(profile.max)}); "
            "rebuild with --min-shapes/--max-shapes covering it"
        )


def inference_shape(
    name: str, declared: Sequence[int], batch: Optional[int], shapes: Mapping[str, Shape]
) -> Shape:
    """The shape to run an input at: `--shapes` if given, else `--batch` on axis 0.

    `declared` has -1 on dynamic axes; a dynamic axis other than the batch needs --shapes.
    """
    declared = tuple(int(d) for d in declared)
    if name in shapes:
        _check_fits(name, declared, shapes[name], "--shapes")
        return tuple(shapes[name])
    if not declared:
        return ()
    first = declared[0]
    if batch is not None and first >= 0 and batch != first:
        raise GdwsError(
            f"--batch {batch}: input {name!r} has a fixed batch of {first} "
            f"({format_shape(declared)}); export it with a dynamic batch axis"
        )
    shape = ((batch or 1) if first < 0 else first, *declared[1:])
    if is_dynamic(shape):
        raise GdwsError(
            f"input {name!r} has dynamic axes besides the batch ({format_shape(declared)}); "
            f"give them with --shapes {name}:{format_shape(d if d > 0 else 1 for d in shape)}"
        )
    return shape
