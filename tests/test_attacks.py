"""Attacks stay inside their budget, find adversarial examples, and never lose one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize

from gdws_deploy.errors import GdwsError
from gdws_deploy.robustness.attacks import (
    Normalized,
    SampleRandom,
    apgd_checkpoints,
    make_attacks,
    margin,
    norm_of,
    parse_fraction,
    parse_per_norm,
    project,
    run_attack,
    steepest_direction,
    worst_case,
)
from gdws_deploy.robustness.attacks.fab import linf_step_to_plane
from gdws_deploy.robustness.attacks.seeding import _mix
from gdws_deploy.robustness.attacks.square import square_fraction
from gdws_deploy.robustness.data import load_dataset
from tests.digits_fixtures import one_torch_thread, trained_digits_cnn  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits_test():
    data = load_dataset("digits", limit=200)
    return torch.from_numpy(data.x), torch.from_numpy(data.y)


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_fractions_parse_like_the_papers_write_them():
    assert parse_fraction("8/255") == pytest.approx(8 / 255)
    assert parse_fraction(" 0.5 ") == 0.5
    assert parse_per_norm("linf=8/255,l2=0.5", "eps") == {"linf": 8 / 255, "l2": 0.5}
    assert parse_per_norm("4/255", "eps") == {"*": 4 / 255}


@pytest.mark.parametrize(
    "text, value",
    [("0.4/255", 0.4 / 255), ("2/255.0", 2 / 255), ("1e-2", 0.01), ("0.5/255", 0.5 / 255)],
)
def test_any_number_over_any_number_parses_for_eps_and_step_size(text, value):
    assert parse_fraction(text, "--step-size") == pytest.approx(value)
    assert parse_per_norm(f"linf={text}", "--eps") == {"linf": pytest.approx(value)}
    assert parse_per_norm(text, "--step-size") == {"*": pytest.approx(value)}


@pytest.mark.parametrize(
    "text", ["-1", "1/0", "eight", "nan", "inf", "x/3", "1/-255", "-1/-255", "1/inf", "8/255/2"]
)
def test_bad_eps_is_a_one_line_user_error(text):
    with pytest.raises(GdwsError) as error:
        parse_fraction(text, "--eps")
    assert str(error.value).startswith("--eps") and "\n" not in str(error.value)


def test_attack_defaults_follow_the_norm():
    attacks = make_attacks("pgd-linf,pgd-l2,apgd-dlr", {"l2": 1.0}, steps=20)
    assert [a.eps for a in attacks] == [pytest.approx(8 / 255), 1.0, pytest.approx(8 / 255)]
    assert attacks[0].step_size == pytest.approx(2.5 * (8 / 255) / 20)
    assert (attacks[2].method, attacks[2].loss) == ("apgd", "dlr")
    with pytest.raises(GdwsError, match="unknown attack"):
        make_attacks("fgsm")
    with pytest.raises(GdwsError, match="unknown norm"):
        parse_per_norm("l3=1", "eps")


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.7), ("l1", 2.0)])
def test_projection_lands_in_ball_and_box_and_is_idempotent(norm, eps):
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 5, 5, generator=generator)
    delta = torch.randn(16, 3, 5, 5, generator=generator) * 0.8
    projected = project(delta, x, norm, eps)
    assert (norm_of(projected, norm) <= eps * (1 + 1e-6)).all()
    assert ((x + projected) >= 0).all() and ((x + projected) <= 1).all()
    torch.testing.assert_close(project(projected, x, norm, eps), projected, atol=1e-6, rtol=0)


def _solver_projection(delta: np.ndarray, x: np.ndarray, norm: str, eps: float) -> np.ndarray:
    """The projection by a general-purpose constrained solver (SLSQP; l_1 smoothed)."""
    if norm == "l2":
        inside = {"type": "ineq", "fun": lambda d: eps**2 - d @ d}
    else:
        inside = {"type": "ineq", "fun": lambda d: eps - np.sqrt(d**2 + 1e-12).sum()}
    return minimize(
        lambda d: ((d - delta) ** 2).sum(),
        np.zeros_like(delta),
        bounds=list(zip(-x, 1 - x)),
        constraints=[inside],
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 500},
    ).x


@pytest.mark.parametrize("norm, eps", [("l2", 0.6), ("l1", 0.9)])
def test_projection_is_the_closest_feasible_point(norm, eps):
    rng = np.random.default_rng(3)
    for _ in range(5):
        x, delta = rng.random(6), rng.standard_normal(6)
        ours = project(torch.tensor(delta)[None], torch.tensor(x)[None], norm, eps)[0].numpy()
        reference = _solver_projection(delta, x, norm, eps)
        assert np.linalg.norm(ours, 2 if norm == "l2" else 1) <= eps + 1e-9
        assert ((ours - delta) ** 2).sum() <= ((reference - delta) ** 2).sum() + 1e-5


def test_l1_step_is_sparse_unit_and_avoids_blocked_pixels():
    generator = torch.Generator().manual_seed(2)
    grad = torch.randn(4, 1, 20, 20, generator=generator)
    x_adv = torch.rand(4, 1, 20, 20, generator=generator)
    x_adv[grad.abs() > 2] = 1.0  # strong gradients on saturated pixels: half of them blocked
    direction = steepest_direction(grad, x_adv, "l1")
    torch.testing.assert_close(norm_of(direction, "l1"), torch.ones(4))
    assert ((direction != 0).flatten(1).sum(1) == 4).all()  # 1% of 400 pixels
    blocked = (x_adv >= 1) & (grad > 0)
    assert (direction[blocked] == 0).all()


def test_apgd_checkpoints_match_the_paper_schedule():
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]


@pytest.mark.parametrize(
    "name, eps",
    [
        ("pgd-linf", 0.1),
        ("pgd-l2", 0.7),
        ("pgd-l1", 2.0),
        ("apgd-ce", 0.1),
        ("apgd-dlr", 0.1),
        ("apgd-ce-l2", 0.7),
        ("apgd-t", 0.1),
        ("fab-t", 0.1),
        ("square", 0.1),
    ],
)
def test_attack_lowers_accuracy_of_a_trained_model_within_budget(digits_test, name, eps):
    model = trained_digits_cnn()
    x, y = digits_test
    (attack,) = make_attacks(name, {"*": eps}, steps=10, targets=3, queries=300)
    x_adv, margins = run_attack(model, attack, x, y, seed=0)
    clean, robust = _accuracy(model, x, y), _accuracy(model, x_adv, y)
    assert clean > 0.9
    assert robust < clean - 0.25, (clean, robust)
    assert (norm_of(x_adv - x, attack.norm) <= eps * (1 + 1e-5)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():  # the margins reported are those of the returned inputs
        torch.testing.assert_close(margin(model(x_adv), y), margins, atol=1e-4, rtol=1e-4)


def test_worst_case_keeps_every_adversarial_example_found(digits_test):
    model = trained_digits_cnn()
    x, y = digits_test
    strong = make_attacks("pgd-linf", {"*": 0.1}, steps=5)
    alone = worst_case(model, x, y, strong, seed=0)
    powerless = make_attacks("pgd-l2", {"*": 0.0}, steps=5)
    merged = worst_case(model, x, y, strong + powerless, seed=0)
    assert alone.fooled.sum() > 0
    assert (merged.fooled >= alone.fooled).all()
    torch.testing.assert_close(merged.margin[alone.fooled], alone.margin[alone.fooled])
    torch.testing.assert_close(merged.x_adv[alone.fooled], alone.x_adv[alone.fooled])
    with torch.no_grad():
        assert (model(merged.x_adv).argmax(1) != y)[merged.fooled].all()


def test_restarts_only_lower_the_margin(digits_test):
    model = trained_digits_cnn()
    x, y = digits_test
    once = worst_case(model, x, y, make_attacks("pgd-l2", {"*": 0.5}, steps=3), seed=5)
    thrice = worst_case(
        model,
        x,
        y,
        make_attacks("pgd-l2", {"*": 0.5}, steps=3, restarts=3),
        seed=5,
    )
    assert (thrice.margin <= once.margin + 1e-6).all()
    assert thrice.fooled.sum() >= once.fooled.sum()


def test_normalization_is_inside_the_attacked_function(digits_test):
    model = trained_digits_cnn()
    x, y = digits_test
    wrapped = Normalized(model, [0.25], [0.5])
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model((x - 0.25) / 0.5))
    (attack,) = make_attacks("pgd-linf", {"*": 0.05}, steps=5)
    x_adv, _ = run_attack(wrapped, attack, x, y, seed=0)
    change = (x_adv - x).abs().max()
    assert 0.04 < change <= 0.05 + 1e-6  # the budget is in [0, 1] image units
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_dlr_needs_three_classes():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    (attack,) = make_attacks("apgd-dlr", steps=2)
    with pytest.raises(GdwsError, match="3 classes"):
        run_attack(model, attack, torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0]))


def _splitmix64_finalizer(z: int) -> int:
    """The reference finalizer on Python integers, for the torch int64 version."""
    mask = (1 << 64) - 1
    z &= mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_sample_hash_is_splitmix64_with_wrapping_int64_arithmetic():
    values = [0, 1, 12345, -1, -(1 << 63), (1 << 63) - 1, 0x0123456789ABCDEF]
    ours = _mix(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [v & ((1 << 64) - 1) for v in ours] == [_splitmix64_finalizer(v) for v in values]


def test_sample_noise_depends_on_seed_label_and_id_only():
    ids = torch.tensor([5, 9, 2, 700])
    rng = SampleRandom.of(3, ids, 4).fork("apgd-ce", 0)
    noise = rng.uniform(2, 3)
    assert noise.shape == (4, 2, 3) and noise.min() > 0 and noise.max() < 1
    alone = SampleRandom.of(3, ids[2:3], 1).fork("apgd-ce", 0).uniform(2, 3)
    torch.testing.assert_close(alone[0], noise[2], rtol=0, atol=0)
    assert not torch.equal(SampleRandom.of(4, ids, 4).fork("apgd-ce", 0).uniform(2, 3), noise)
    assert not torch.equal(SampleRandom.of(3, ids, 4).fork("apgd-ce", 1).uniform(2, 3), noise)
    many = SampleRandom.of(0, None, 2000).uniform(50)
    assert abs(many.mean().item() - 0.5) < 0.005 and abs(many.std().item() - 12**-0.5) < 0.005
    normal = SampleRandom.of(0, None, 2000).normal(50)
    assert abs(normal.mean().item()) < 0.01 and abs(normal.std().item() - 1) < 0.01


def _fooled_in_batches(model, x, y, attacks, batch_size, order):
    """worst_case run on the samples in `order`, `batch_size` at a time, back in data order."""
    fooled = torch.zeros(len(y), dtype=torch.bool)
    for chunk in order.split(batch_size):
        fooled[chunk] = worst_case(model, x[chunk], y[chunk], attacks, chunk, seed=7).fooled
    return fooled


def test_verdicts_do_not_depend_on_batch_size_or_order(digits_test):
    model = trained_digits_cnn()
    x, y = digits_test
    attacks = make_attacks("pgd-l2,apgd-ce", {"l2": 0.6, "linf": 0.06}, steps=4)
    in_order = torch.arange(len(y))
    reference = _fooled_in_batches(model, x, y, attacks, 64, in_order)
    assert 0 < reference.sum() < len(y)  # some broken, some robust: the test can tell
    assert torch.equal(_fooled_in_batches(model, x, y, attacks, 7, in_order), reference)
    shuffled = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_fooled_in_batches(model, x, y, attacks, 7, shuffled), reference)


def test_a_combination_is_never_more_robust_than_its_first_attack(digits_test):
    """Across batches too: a generator shared by batches and attacks lost 2 samples here."""
    model = trained_digits_cnn()
    x, y = digits_test
    ce, dlr = make_attacks("apgd-ce,apgd-dlr", {"*": 0.08}, steps=2)
    in_order = torch.arange(len(y))
    alone = _fooled_in_batches(model, x, y, [ce], 32, in_order)
    both = _fooled_in_batches(model, x, y, [ce, dlr], 32, in_order)
    assert 0 < alone.sum() < len(y)
    assert (both >= alone).all()


def test_autoattack_is_the_standard_composition():
    attacks = make_attacks("autoattack", {"*": 4 / 255})
    assert [a.name for a in attacks] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert {(a.steps, a.targets, a.queries, a.norm) for a in attacks} == {(100, 9, 5000, "linf")}
    assert {a.eps for a in attacks} == {4 / 255}
    mixed = make_attacks("pgd-linf,autoattack,apgd-ce", steps=None)
    assert [(a.name, a.steps) for a in mixed][:2] == [("pgd-linf", 10), ("apgd-ce", 100)]
    assert len(mixed) == 5  # apgd-ce once
    assert {a.steps for a in make_attacks("autoattack", steps=7)} == {7}


def test_square_window_shrinks_on_the_papers_schedule():
    fractions = [square_fraction(0.8, query, 10000) for query in (0, 10, 11, 51, 201, 9000)]
    assert fractions == [0.8, 0.8, 0.4, 0.2, 0.1, 0.8 / 512]
    assert square_fraction(0.8, 50, 1000) == 0.8 / 8  # rescaled: step 500 of 10000


def test_fab_step_is_the_smallest_linf_step_onto_the_plane_in_the_box():
    rng = np.random.default_rng(4)
    for _ in range(20):
        t, w = rng.random(7), rng.standard_normal(7) * (rng.random(7) > 0.2)
        c = rng.standard_normal() * 0.5
        d = linf_step_to_plane(
            *(torch.tensor(v, dtype=torch.float64)[None] for v in (t, w)),
            torch.tensor([c], dtype=torch.float64),
        )[0].numpy()
        assert (t + d >= -1e-12).all() and (t + d <= 1 + 1e-12).all()
        # the linear program: min s s.t. |d_i| <= s, 0 <= t + d <= 1, <w, d> = c
        lp = linprog(
            np.r_[np.zeros(7), 1.0],
            A_ub=np.block([[np.eye(7), -np.ones((7, 1))], [-np.eye(7), -np.ones((7, 1))]]),
            b_ub=np.zeros(14),
            A_eq=np.r_[w, 0.0][None],
            b_eq=[c],
            bounds=[*zip(-t, 1 - t), (0, None)],
        )
        if lp.status == 0:
            assert w @ d == pytest.approx(c, abs=1e-9)
            assert np.abs(d).max() == pytest.approx(lp.x[-1], abs=1e-9)
        else:  # the box keeps the plane out of reach: the step goes as far as it can
            assert abs(w @ d) == pytest.approx(np.abs(w) @ np.where(w * c > 0, 1 - t, t))


@pytest.mark.parametrize("name", ["apgd-t", "fab-t", "square"])
def test_new_attacks_give_verdicts_independent_of_batching(digits_test, name):
    model = trained_digits_cnn()
    x, y = digits_test
    attacks = make_attacks(name, {"*": 0.06}, steps=3, targets=2, queries=25, restarts=2)
    in_order = torch.arange(len(y))
    reference = _fooled_in_batches(model, x, y, attacks, 64, in_order)
    assert 0 < reference.sum() < len(y)
    shuffled = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_fooled_in_batches(model, x, y, attacks, 7, shuffled), reference)


def test_worst_case_records_the_cumulative_worst_case_after_each_attack(digits_test):
    model = trained_digits_cnn()
    x, y = digits_test
    attacks = make_attacks("apgd-ce,square", {"*": 0.05}, steps=4, queries=50)
    found = worst_case(model, x, y, attacks, seed=2)
    first, second = (margins < 0 for margins in found.margin_after)
    assert torch.equal(first, worst_case(model, x, y, attacks[:1], seed=2).fooled)
    assert (second >= first).all() and torch.equal(second, found.fooled)
    torch.testing.assert_close(found.x_after[-1], found.x_adv)


def test_targeted_attacks_take_every_class_a_small_model_has_and_need_enough():
    torch.manual_seed(0)
    four = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 4))
    x, y = torch.rand(6, 1, 2, 2), torch.arange(6) % 4
    for name in ("apgd-t", "fab-t"):  # 9 targets asked, 3 there
        (attack,) = make_attacks(name, {"*": 0.5}, steps=3)
        x_adv, _ = run_attack(four, attack, x, y)
        assert (norm_of(x_adv - x, "linf") <= 0.5 + 1e-6).all()
    three = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with pytest.raises(GdwsError, match="at least 4 classes"):
        run_attack(three, make_attacks("apgd-t", steps=2)[0], x, y % 3)
