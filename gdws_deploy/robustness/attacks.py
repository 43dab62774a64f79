"""White-box attacks under l_inf, l_2 and l_1 budgets, on inputs in [0, 1].

PGD (Madry et al. 2018) with random start and restarts; APGD with the cross-entropy or
the DLR loss and AutoAttack's step-size schedule (Croce & Hein 2020). Every attack keeps,
per sample, the iterate with the lowest margin z_y - max_{j != y} z_j it has seen, so an
adversarial example once found is never lost; `worst_case` merges attacks and restarts
the same way and only spends effort on samples not yet broken.

Projections are exact onto the norm ball intersected with the [0, 1] box: l_inf by
clipping; l_2 and l_1 by a per-sample bisection on the KKT multiplier (40 halvings, the
feasible end kept, so results never leave the ball).

Everything is vectorized over the batch. Models that expect normalized input are wrapped
in `Normalized`, so the budget always applies to the [0, 1] image.

Randomness is per sample: every attack takes the samples' indices in their data set and a
base seed, and each random start or choice is a counter-based hash of (seed, attack,
restart, sample id, element) (`SampleRandom`), so a verdict never depends on the batch a
sample came in, its position there, or which other attacks ran before.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F  # noqa: N812 (the torch idiom)
from torch import nn

from gdws_deploy.errors import GdwsError

NORMS = ("linf", "l2", "l1")
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5, "l1": 12.0}
# name -> (method, norm, loss)
ATTACKS = {
    "pgd-linf": ("pgd", "linf", "ce"),
    "pgd-l2": ("pgd", "l2", "ce"),
    "pgd-l1": ("pgd", "l1", "ce"),
    "apgd-ce": ("apgd", "linf", "ce"),
    "apgd-dlr": ("apgd", "linf", "dlr"),
    "apgd-ce-l2": ("apgd", "l2", "ce"),
    "apgd-dlr-l2": ("apgd", "l2", "dlr"),
}
L1_STEP_FRACTION = 0.01  # coordinates moved per l_1 step (SLIDE's 99th percentile)
APGD_MOMENTUM = 0.75
APGD_RHO = 0.75
_BISECTIONS = 40

Model = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------
# Settings


def parse_fraction(text: Union[str, float], what: str = "value") -> float:
    """A number or any number over any number ('8/255', '0.4/255', '1e-2') -> float >= 0.

    Papers write budgets as fractions of the pixel range, often with a decimal numerator;
    anything else (nan, inf, a zero or negative denominator, 'x/3') is a GdwsError.
    """
    numerator, slash, denominator = str(text).strip().partition("/")
    try:
        parts = [float(numerator), *([float(denominator)] if slash else [])]
        value = parts[0] / parts[1] if slash else parts[0]
    except (ValueError, ZeroDivisionError) as error:
        raise GdwsError(f"{what} {text!r} is not a number or fraction like 8/255") from error
    if not all(math.isfinite(part) and part >= 0 for part in parts):
        raise GdwsError(f"{what} must be a finite number >= 0, got {text}")
    return value


def parse_per_norm(text: Optional[str], what: str) -> Dict[str, float]:
    """'8/255' (every norm) or 'linf=8/255,l2=0.5' -> {norm: value}; '*' means every norm."""
    if text is None or not str(text).strip():
        return {}
    values = {}
    for part in str(text).split(","):
        norm, _, value = part.rpartition("=")
        norm = norm.strip() or "*"
        if norm not in (*NORMS, "*"):
            raise GdwsError(f"{what}: unknown norm {norm!r} (use {', '.join(NORMS)})")
        values[norm] = parse_fraction(value, what)
    return values


@dataclass(frozen=True)
class Attack:
    """One configured attack; `step_size` only matters for PGD (APGD sets its own)."""

    name: str
    method: str
    norm: str
    loss: str
    eps: float
    steps: int
    step_size: float
    restarts: int = 1

    def to_dict(self) -> Dict:
        return asdict(self)


def make_attacks(
    names: Union[str, Sequence[str]],
    eps: Optional[Mapping[str, float]] = None,
    steps: int = 10,
    step_size: Optional[Mapping[str, float]] = None,
    restarts: int = 1,
) -> List[Attack]:
    """Attacks by name ('pgd-linf,apgd-ce'); eps/step_size per norm ('*' for all).

    Defaults: eps 8/255 (l_inf), 0.5 (l_2), 12 (l_1); PGD step 2.5 * eps / steps.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise GdwsError("no attack given")
    if int(steps) != steps or steps < 1:
        raise GdwsError(f"steps must be a whole number >= 1, got {steps}")
    if int(restarts) != restarts or restarts < 1:
        raise GdwsError(f"restarts must be a whole number >= 1, got {restarts}")
    eps, step_size = dict(eps or {}), dict(step_size or {})
    attacks = []
    for name in names:
        if name not in ATTACKS:
            raise GdwsError(f"unknown attack {name!r} (choose from {', '.join(ATTACKS)})")
        method, norm, loss = ATTACKS[name]
        budget = eps.get(norm, eps.get("*", DEFAULT_EPS[norm]))
        step = step_size.get(norm, step_size.get("*", 2.5 * budget / steps))
        attacks.append(Attack(name, method, norm, loss, budget, int(steps), step, int(restarts)))
    return attacks


class Normalized(nn.Module):
    """`model((x - mean) / std)`: the attack sees [0, 1] images, the model its own input."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if any(s <= 0 for s in std):
            raise GdwsError(f"std must be positive, got {list(std)}")
        self.model = model
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).reshape(1, -1, 1, 1)
        )
        self.register_buffer(
            "std", torch.tensor(list(std), dtype=torch.float32).reshape(1, -1, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def parse_channels(text: Optional[str], what: str) -> Optional[List[float]]:
    """'0.49,0.48,0.45' -> [0.49, 0.48, 0.45]; None or '' -> None."""
    if text is None or not str(text).strip():
        return None
    try:
        return [float(part) for part in str(text).split(",")]
    except ValueError as error:
        raise GdwsError(f"{what} must be comma-separated numbers, got {text!r}") from error


def with_normalization(
    model: nn.Module, mean: Optional[Sequence[float]], std: Optional[Sequence[float]], channels: int
) -> nn.Module:
    """`model` itself without mean/std, else Normalized; each has 1 or `channels` values."""
    if not mean and not std:
        return model
    mean, std = list(mean or [0.0]), list(std or [1.0])
    for what, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise GdwsError(
                f"--{what} has {len(values)} values, the images have {channels} channels"
            )
    return Normalized(model, mean, std)


# ----------------------------------------------------------------------------------------
# Per-sample randomness


def _int64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch holds."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic on signed integers)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer: int64 -> int64, a bijection that scrambles every bit."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _label_key(label: Union[str, int]) -> int:
    """A stable 64-bit key for a label (Python's hash() changes between processes)."""
    digest = hashlib.blake2b(str(label).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class SampleRandom:
    """Random numbers for a batch that depend only on each sample's key: its id in the data
    set, the base seed and the labels forked in (attack, restart, purpose). Vectorized: a
    counter-based hash (splitmix64) of (key, element index), no generator state."""

    def __init__(self, keys: torch.Tensor) -> None:
        self.keys = keys

    @classmethod
    def of(
        cls, seed: int, sample_ids: Optional[torch.Tensor], count: int, device=None
    ) -> SampleRandom:
        """Keys for samples `sample_ids` (default 0..count-1) under `seed`."""
        ids = torch.arange(count) if sample_ids is None else torch.as_tensor(sample_ids)
        if ids.shape != (count,):
            raise GdwsError(f"sample_ids has shape {tuple(ids.shape)}, expected ({count},)")
        base = _mix(torch.tensor(_label_key(f"seed {int(seed)}"), dtype=torch.int64))
        return cls(_mix(base ^ _mix(ids.to(device=device, dtype=torch.int64) * _GOLDEN)))

    def fork(self, *labels: Union[str, int]) -> SampleRandom:
        """Independent streams per label: fork('apgd-ce', restart)."""
        keys = self.keys
        for label in labels:
            keys = _mix(keys ^ _label_key(label))
        return SampleRandom(keys)

    def subset(self, index: torch.Tensor) -> SampleRandom:
        return SampleRandom(self.keys[index])

    def uniform(self, *shape: int) -> torch.Tensor:
        """(N, *shape) floats in (0, 1), 24 random bits each."""
        count = math.prod(shape)
        counter = torch.arange(1, count + 1, device=self.keys.device) * _GOLDEN
        bits = _shift_right(_mix(self.keys[:, None] + counter[None, :]), 40)
        return ((bits.float() + 0.5) / (1 << 24)).reshape(len(self.keys), *shape)

    def normal(self, *shape: int) -> torch.Tensor:
        """(N, *shape) standard normals (Box-Muller)."""
        u = self.uniform(2, *shape)
        return torch.sqrt(-2 * torch.log(u[:, 0])) * torch.cos(2 * math.pi * u[:, 1])

    def integers(self, high: torch.Tensor, *shape: int) -> torch.Tensor:
        """(N, *shape) integers in [0, high), high broadcasting against that shape."""
        return (self.uniform(*shape) * high).long().clamp_max(high - 1)


# ----------------------------------------------------------------------------------------
# Geometry: per-sample norms, steepest-ascent directions, exact projections


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) broadcasting against `like`."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def norm_of(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """(N, ...) -> (N,) per-sample norm."""
    order = {"linf": math.inf, "l2": 2, "l1": 1}[norm]
    return torch.linalg.vector_norm(_flat(delta), ord=order, dim=1)


def _bisect(
    norm_at: Callable[[torch.Tensor], torch.Tensor],
    feasible: torch.Tensor,
    infeasible: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Per-sample parameter between `feasible` and `infeasible` where norm_at crosses eps.

    norm_at is monotone in the parameter; the end kept is always the feasible one.
    """
    for _ in range(_BISECTIONS):
        middle = (feasible + infeasible) / 2
        ok = norm_at(middle) <= eps
        feasible = torch.where(ok, middle, feasible)
        infeasible = torch.where(ok, infeasible, middle)
    return feasible


def project(delta: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """The closest perturbation to `delta` with ||d|| <= eps and x + d in [0, 1]."""
    low, high = -x, 1 - x
    if norm == "linf":
        return torch.minimum(torch.maximum(delta.clamp(-eps, eps), low), high)
    if norm == "l2":  # d = clip(t * delta, box), t in [0, 1] (t = 1 / (1 + multiplier))
        boxed = torch.minimum(torch.maximum(delta, low), high)
        inside = norm_of(boxed, "l2") <= eps

        def scaled(t: torch.Tensor) -> torch.Tensor:
            return torch.minimum(torch.maximum(delta * _per_sample(t, delta), low), high)

        start = torch.zeros(len(delta), dtype=delta.dtype, device=delta.device)
        t = _bisect(lambda t: norm_of(scaled(t), "l2"), start, torch.ones_like(start), eps)
        return torch.where(_per_sample(inside, delta), boxed, scaled(t))
    # l1: d = clip(soft_threshold(delta, lam), box), lam >= 0 found by bisection
    magnitude, sign = delta.abs(), delta.sign()

    def shrunk(lam: torch.Tensor) -> torch.Tensor:
        soft = sign * (magnitude - _per_sample(lam, delta)).clamp_min(0)
        return torch.minimum(torch.maximum(soft, low), high)

    zero = torch.zeros(len(delta), dtype=delta.dtype, device=delta.device)
    inside = norm_of(shrunk(zero), "l1") <= eps
    top = _flat(magnitude).amax(dim=1)
    lam = _bisect(lambda lam: norm_of(shrunk(lam), "l1"), top, zero, eps)
    return shrunk(torch.where(inside, zero, lam))


def steepest_direction(grad: torch.Tensor, x_adv: torch.Tensor, norm: str) -> torch.Tensor:
    """The unit-norm direction of steepest ascent of a linear function with gradient `grad`.

    l_1: the sparse steepest step (SLIDE, Tramer & Boneh 2019): the sign of the largest
    1% of gradient entries, skipping pixels the [0, 1] box blocks, scaled to l_1 norm 1.
    """
    if norm == "linf":
        return grad.sign()
    if norm == "l2":
        return grad / _per_sample(norm_of(grad, "l2").clamp_min(1e-12), grad)
    blocked = ((x_adv >= 1) & (grad > 0)) | ((x_adv <= 0) & (grad < 0))
    strength = _flat(grad.abs().masked_fill(blocked, 0))
    count = max(1, round(L1_STEP_FRACTION * strength.shape[1]))
    chosen = torch.zeros_like(strength).scatter_(1, strength.topk(count, dim=1).indices, 1.0)
    return grad.sign() * chosen.reshape(grad.shape) / count


def random_start(x: torch.Tensor, norm: str, eps: float, rng: SampleRandom) -> torch.Tensor:
    """A random perturbation inside the feasible set, drawn from each sample's own stream."""
    shape = x.shape[1:]
    if norm == "linf":
        noise = (rng.uniform(*shape) * 2 - 1) * eps
    else:
        if norm == "l2":
            noise = rng.normal(*shape)
        else:
            noise = torch.distributions.Laplace(0.0, 1.0).icdf(
                rng.uniform(*shape).clamp(1e-6, 1 - 1e-6)
            )
        radius = rng.fork("radius").uniform() * eps  # (N,)
        noise = noise * _per_sample(radius / norm_of(noise, norm).clamp_min(1e-12), noise)
    return project(noise.to(x.device, x.dtype), x, norm, eps)


# ----------------------------------------------------------------------------------------
# Losses


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j per sample: negative means misclassified."""
    true = logits.gather(1, y[:, None])[:, 0]
    others = logits.scatter(1, y[:, None], -math.inf)
    return true - others.amax(dim=1)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)."""
    top = logits.topk(3, dim=1).values
    return -margin(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


def _loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    return dlr_loss(logits, y)


def _evaluate(
    model: Model, x_adv: torch.Tensor, y: torch.Tensor, loss: str, with_grad: bool = True
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(per-sample loss, margin, input gradient of the summed loss)."""
    if not with_grad:
        with torch.no_grad():
            logits = model(x_adv)
        return _loss(logits, y, loss), margin(logits, y), None
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    values = _loss(logits, y, loss)
    (grad,) = torch.autograd.grad(values.sum(), x_adv)
    return values.detach(), margin(logits.detach(), y), grad


class _Best:
    """Per-sample lowest-margin iterate seen so far."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.clone()
        self.margin = torch.full((len(x),), math.inf, device=x.device)

    def offer(self, x_adv: torch.Tensor, margins: torch.Tensor) -> None:
        better = margins < self.margin
        self.margin = torch.where(better, margins, self.margin)
        self.x = torch.where(_per_sample(better, x_adv), x_adv.detach(), self.x)


# ----------------------------------------------------------------------------------------
# Attacks


def pgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "linf",
    eps: float = 8 / 255,
    steps: int = 10,
    step_size: Optional[float] = None,
    loss: str = "ce",
    random_init: bool = True,
    sample_ids: Optional[torch.Tensor] = None,
    seed: int = 0,
    restart: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Projected gradient ascent on the loss: (lowest-margin iterates, their margins).

    sample_ids (default 0..N-1), seed and restart pick each sample's random start.
    """
    step_size = 2.5 * eps / steps if step_size is None else step_size
    rng = _stream(f"pgd-{norm}-{loss}", x, sample_ids, seed, restart)
    delta = random_start(x, norm, eps, rng) if random_init else torch.zeros_like(x)
    best = _Best(x)
    for step in range(steps + 1):
        _, margins, grad = _evaluate(model, x + delta, y, loss, with_grad=step < steps)
        best.offer(x + delta, margins)
        if grad is not None:
            delta = project(
                delta + step_size * steepest_direction(grad, x + delta, norm), x, norm, eps
            )
    return best.x, best.margin


def apgd_checkpoints(steps: int) -> List[int]:
    """Iterations where APGD may halve its step: w_j = ceil(p_j * steps), Croce & Hein 2020.

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
    """
    fractions = [0.0, 0.22]
    while fractions[-1] < 1:
        fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
    # round() first: 0.41 * 100 is 41.000000000000004 in floating point
    return sorted({math.ceil(round(p * steps, 9)) for p in fractions if p <= 1})


def apgd(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "linf",
    eps: float = 8 / 255,
    steps: int = 100,
    loss: str = "ce",
    sample_ids: Optional[torch.Tensor] = None,
    seed: int = 0,
    restart: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Auto-PGD (Croce & Hein 2020, Algorithm 1): momentum 0.75, step 2*eps halved at the
    checkpoints where fewer than 75% of the steps since the last one raised the loss, or
    where neither the step nor the best loss changed; a halving restarts from the best point.
    """
    if norm not in ("linf", "l2"):
        raise GdwsError(f"APGD supports l_inf and l_2 budgets, not {norm}")
    if loss == "dlr" and x.shape[0] and _num_classes(model, x[:1]) < 3:
        raise GdwsError("the DLR loss needs at least 3 classes")
    checkpoints = apgd_checkpoints(steps)
    step = torch.full((len(x),), 2.0 * eps, device=x.device)
    rng = _stream(f"apgd-{norm}-{loss}", x, sample_ids, seed, restart)
    x_cur = x + random_start(x, norm, eps, rng)
    f_cur, margins, grad = _evaluate(model, x_cur, y, loss)
    best = _Best(x)
    best.offer(x_cur, margins)
    f_max, x_max, grad_max = f_cur.clone(), x_cur.clone(), grad.clone()
    x_prev = x_cur.clone()
    increases = torch.zeros(len(x), device=x.device)
    step_at_checkpoint, f_max_at_checkpoint = step.clone(), f_max.clone()
    previous_checkpoint = 0
    for k in range(steps):
        scale = _per_sample(step, x)
        z = x + project(x_cur + scale * steepest_direction(grad, x_cur, norm) - x, x, norm, eps)
        weight = 1.0 if k == 0 else APGD_MOMENTUM
        moved = x_cur + weight * (z - x_cur) + (1 - weight) * (x_cur - x_prev)
        x_prev, x_cur = x_cur, x + project(moved - x, x, norm, eps)
        f_new, margins, grad = _evaluate(model, x_cur, y, loss, with_grad=k < steps - 1)
        best.offer(x_cur, margins)
        increases += (f_new > f_cur).float()
        f_cur = f_new
        improved = f_new > f_max
        f_max = torch.where(improved, f_new, f_max)
        x_max = torch.where(_per_sample(improved, x), x_cur, x_max)
        if grad is None:
            break
        grad_max = torch.where(_per_sample(improved, x), grad, grad_max)
        if k + 1 in checkpoints and k + 1 > previous_checkpoint:
            window = k + 1 - previous_checkpoint
            too_few = increases < APGD_RHO * window
            stalled = (step_at_checkpoint == step) & (f_max_at_checkpoint == f_max)
            halve = too_few | stalled
            step = torch.where(halve, step / 2, step)
            restart = _per_sample(halve, x)
            x_cur = torch.where(restart, x_max, x_cur)
            x_prev = torch.where(restart, x_max, x_prev)
            grad = torch.where(restart, grad_max, grad)
            f_cur = torch.where(halve, f_max, f_cur)
            increases.zero_()
            step_at_checkpoint, f_max_at_checkpoint = step.clone(), f_max.clone()
            previous_checkpoint = k + 1
    return best.x, best.margin


def _num_classes(model: Model, sample: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(sample).shape[1])


def _stream(
    name: str, x: torch.Tensor, sample_ids: Optional[torch.Tensor], seed: int, restart: int
) -> SampleRandom:
    """The random stream of attack `name`'s restart `restart` on these samples."""
    return SampleRandom.of(seed, sample_ids, len(x), x.device).fork(name, restart)


def run_attack(
    model: Model,
    attack: Attack,
    x: torch.Tensor,
    y: torch.Tensor,
    sample_ids: Optional[torch.Tensor] = None,
    seed: int = 0,
    restart: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One restart of `attack`: (lowest-margin inputs, margins)."""
    if attack.method == "pgd":
        return pgd(
            model,
            x,
            y,
            attack.norm,
            attack.eps,
            attack.steps,
            attack.step_size,
            attack.loss,
            True,
            sample_ids,
            seed,
            restart,
        )
    return apgd(
        model, x, y, attack.norm, attack.eps, attack.steps, attack.loss, sample_ids, seed, restart
    )


@dataclass
class WorstCase:
    """Per sample: the most adversarial input found and its margin on the attacked model."""

    x_adv: torch.Tensor
    margin: torch.Tensor

    @property
    def fooled(self) -> torch.Tensor:
        return self.margin < 0


def worst_case(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[Attack],
    sample_ids: Optional[torch.Tensor] = None,
    seed: int = 0,
) -> WorstCase:
    """Every attack and restart; per sample the lowest margin wins, broken samples rest.

    Samples already misclassified (clean or by an earlier run) are not attacked again.
    sample_ids are the samples' indices in their data set (default 0..N-1): with `seed`
    they fix every random choice, so a sample's verdict is the same in any batch.
    """
    ids = torch.arange(len(x)) if sample_ids is None else torch.as_tensor(sample_ids)
    with torch.no_grad():
        best_margin = margin(model(x), y)
    best_x = x.clone()
    for attack in attacks:
        for restart in range(attack.restarts):
            active = (best_margin >= 0).nonzero()[:, 0]
            if len(active) == 0:
                return WorstCase(best_x, best_margin)
            x_adv, margins = run_attack(
                model, attack, x[active], y[active], ids[active.cpu()], seed, restart
            )
            better = margins < best_margin[active]
            best_margin[active] = torch.where(better, margins, best_margin[active])
            best_x[active] = torch.where(_per_sample(better, x_adv), x_adv, best_x[active])
    return WorstCase(best_x, best_margin)
