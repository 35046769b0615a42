"""Rank policies: the reference's formulas, rounding and validation, on the numbers themselves."""

from __future__ import annotations

import math

import pytest

from lowrank_ir import Policy, make_divisible
from lowrank_ir._policy import conv_ranks, matrix_rank, validate_config


@pytest.mark.parametrize(("value", "divisor", "expected"), [
    (320.4, 64, 320), (100, 64, 128), (10, 64, 64), (95.9, 64, 128), (70, 64, 64), (33, 1, 33), (32.6, 1, 33),
    (60, 16, 64), (56, 16, 64), (55, 16, 64), (49, 16, 48),
])
def test_make_divisible(value: float, divisor: int, expected: int) -> None:
    assert make_divisible(value, divisor) == expected
    assert make_divisible(value, divisor) % divisor == 0
    assert make_divisible(value, divisor) >= 0.9 * value


def test_make_divisible_never_rounds_down_by_more_than_ten_percent() -> None:
    for value in range(1, 2000):
        assert make_divisible(value, 64) >= 0.9 * value


@pytest.mark.parametrize(("shape", "ratio"), [((1000, 2048), 0.5), ((256, 512), 0.3), ((10, 4096), 0.9)])
def test_matrix_ratio_formula(shape, ratio) -> None:
    out, inp = shape
    rank, reason = matrix_rank(shape, ratio, 1)
    expected = int(ratio * out * inp / (out + inp))
    assert (rank, reason) == (expected, "")
    assert rank * (out + inp) <= ratio * out * inp < (rank + 1) * (out + inp)


def test_matrix_left_alone_when_no_saving() -> None:
    rank, reason = matrix_rank((10, 256), 0.5, 64)
    assert rank == 0 and "would not save parameters" in reason


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (3, 1), (1, 7), (5,)])
def test_conv_ratio_is_the_larger_root(kernel) -> None:
    out, inp, ratio = 256, 128, 0.5
    taps = math.prod(kernel)
    (r_out, r_in), reason = conv_ranks((out, inp, *kernel), ratio, 1)
    root = (-(inp + out) + math.sqrt((inp + out) ** 2 + 4 * taps * ratio * out * inp * taps)) / (2 * taps)
    assert reason == ""
    assert r_out == r_in == round(root)
    # the root keeps the requested fraction of parameters
    assert taps * root**2 + (inp + out) * root == pytest.approx(ratio * out * inp * taps)


def test_non_square_kernel_uses_kh_times_kw() -> None:
    (rank_31, _), _ = conv_ranks((256, 256, 3, 1), 0.5, 1)
    (rank_33, _), _ = conv_ranks((256, 256, 3, 3), 0.5, 1)
    assert rank_31 != rank_33  # the reference's kh² would make them equal


def test_conv_ranks_capped_at_the_dimensions() -> None:
    (r_out, r_in), reason = conv_ranks((1000, 2, 3, 3), 7, 1)
    assert (r_out, r_in) == (7, 2) and reason == ""


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.2, "0.5", True, 2, None])
def test_ratio_validation(bad) -> None:
    with pytest.raises(ValueError, match="ratio must be a float strictly between 0 and 1"):
        Policy.ratio(bad)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_fixed_validation(bad) -> None:
    with pytest.raises(ValueError, match="fixed rank must be an int > 0"):
        Policy.fixed(bad)


@pytest.mark.parametrize(("bad", "message"), [
    ({}, "non-empty dict"), ([("fc", 3)], "non-empty dict"), ({"(": 3}, "not a valid regular expression"),
    ({"fc": "svd"}, "only method name accepted is 'vbmf'"), ({"fc": 0}, "int > 0"), ({"fc": 1.5}, "ratio"),
    ({"fc": None}, "int rank > 0, a float ratio"), ({3: 4}, "keys must be regular-expression strings"),
])
def test_dict_validation(bad, message) -> None:
    with pytest.raises(ValueError, match=message):
        Policy.from_dict(bad)


def test_dict_first_match_in_order_wins() -> None:
    policy = Policy.from_dict({r"layer1\.": 8, r"conv": 0.25, r".*": "VBMF"})
    assert policy.spec_for("layer1.0.conv1") == 8
    assert policy.spec_for("layer2.0.conv1") == 0.25
    assert policy.spec_for("fc") == "vbmf"


@pytest.mark.parametrize(("excludes", "message"), [("fc", "list or tuple"), (["fc", 3], r"not: \[3\]")])
def test_excludes_validation(excludes, message) -> None:
    with pytest.raises(ValueError, match=message):
        Policy.ratio(0.5, excludes=excludes)


@pytest.mark.parametrize("bad", [0, -64, 1.5, True, "64"])
def test_divisor_validation(bad) -> None:
    with pytest.raises(ValueError, match="divisor must be an int > 0"):
        Policy.ratio(0.5, divisor=bad)


def test_excludes_are_exact_names() -> None:
    policy = Policy.ratio(0.5, excludes=["fc"])
    assert policy.spec_for("fc") is None and policy.spec_for("fc2") == 0.5


@pytest.mark.parametrize("bad", [{}, [], {"fc": 0}, {"fc": [1]}, {"fc": [1, 0]}, {"fc": "3"}, {"fc": True}])
def test_config_validation(bad) -> None:
    with pytest.raises(ValueError, match="must be"):
        validate_config(bad)


def test_config_accepts_ints_and_pairs() -> None:
    assert validate_config({"fc": 3, "conv": (4, 5)}) == {"fc": 3, "conv": [4, 5]}
