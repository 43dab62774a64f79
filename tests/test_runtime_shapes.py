"""Shape flags in trtexec's spelling and the optimization profiles built from them."""

from __future__ import annotations

import pytest

from gdws_deploy.errors import GdwsError
from gdws_deploy.runtime.shapes import (
    Profile,
    check_in_profile,
    format_shape,
    inference_shape,
    parse_shape_specs,
    resolve_profiles,
)

DYNAMIC = {"images": (-1, 3, 32, 32)}


def profiles(**flags):
    given = {k: parse_shape_specs(flags.get(k, "")) for k in ("shapes", "min", "opt", "max")}
    return resolve_profiles(DYNAMIC, given["shapes"], given["min"], given["opt"], given["max"])


def test_shape_specs_parse_trtexec_syntax_with_quotes_and_colons_in_names():
    specs = parse_shape_specs("images:1x3x32x32,'mask':4x8, ns:part:2x2")
    assert specs == {"images": (1, 3, 32, 32), "mask": (4, 8), "ns:part": (2, 2)}
    assert parse_shape_specs("") == {}


@pytest.mark.parametrize(
    "text", ["images", "images:1x0x3", "images:1xax3", ":1x3", "a:1x2,a:1x2", "images:"]
)
def test_bad_shape_specs_are_one_line_errors(text):
    with pytest.raises(GdwsError, match="--shapes"):
        parse_shape_specs(text)


def test_fixed_shapes_give_equal_min_opt_max():
    assert profiles(shapes="images:8x3x32x32")["images"] == Profile(*[(8, 3, 32, 32)] * 3)


def test_missing_min_and_max_default_to_opt_like_trtexec():
    result = profiles(opt="images:8x3x32x32", max="images:32x3x32x32")["images"]
    assert result == Profile((8, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))


def test_unsized_dynamic_batch_defaults_to_one_or_the_given_batch():
    assert resolve_profiles(DYNAMIC, {}, {}, {}, {})["images"].opt == (1, 3, 32, 32)
    assert resolve_profiles(DYNAMIC, {}, {}, {}, {}, batch=16)["images"].max == (16, 3, 32, 32)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"min": "images:8x3x32x32", "max": "images:4x3x32x32"}, "min <= opt <= max"),
        ({"opt": "images:8x4x32x32"}, "fixed size 3 on axis 1"),
        ({"opt": "images:8x3x32"}, "rank 4"),
        ({"opt": "other:1x3x32x32"}, "no input named 'other'"),
        ({"shapes": "images:1x3x32x32", "max": "images:4x3x32x32"}, "either --shapes"),
    ],
)
def test_impossible_profiles_are_refused(flags, message):
    with pytest.raises(GdwsError, match=message):
        profiles(**flags)


def test_shapes_outside_the_profile_are_refused_inside_accepted():
    profile = Profile((1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))
    check_in_profile("images", (32, 3, 32, 32), profile)
    with pytest.raises(GdwsError, match=r"outside the engine.s profile .*max 32x3x32x32"):
        check_in_profile("images", (33, 3, 32, 32), profile)
    with pytest.raises(GdwsError, match="outside"):
        check_in_profile("images", (4, 3, 32), profile)


def test_inference_shape_puts_batch_on_a_dynamic_first_axis_only():
    assert inference_shape("images", (-1, 3, 32, 32), 8, {}) == (8, 3, 32, 32)
    assert inference_shape("images", (-1, 3, 32, 32), None, {}) == (1, 3, 32, 32)
    assert inference_shape("images", (2, 3, 4, 4), None, {}) == (2, 3, 4, 4)
    with pytest.raises(GdwsError, match="fixed batch of 2"):
        inference_shape("images", (2, 3, 4, 4), 8, {})
    with pytest.raises(GdwsError, match="--shapes images:1x3x1x1"):
        inference_shape("images", (-1, 3, -1, -1), None, {})


def test_format_shape_writes_trtexec_dims():
    assert format_shape((1, 3, 32, 32)) == "1x3x32x32"
    assert format_shape(()) == "scalar"
