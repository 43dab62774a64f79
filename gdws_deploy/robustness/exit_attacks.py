"""Attacks on a multi-exit model as it is deployed: gradients from the torch mirror of the
whole graph (every exit), verdicts from the staged runtime with its entropy thresholds.

A multi-exit model's outputs are `exit_0`, ..., `final` (runtime/staged.py); an input
leaves at the first exit whose softmax entropy is at most that exit's threshold. Papers
judge such models by one exit; here every verdict is the staged runtime's answer, and
every attack keeps, per sample, the iterate with the lowest margin of that answer
(computed on the mirror with the runtime's own gate, runtime.staged.exit_taken).

The attacks (Hu et al., ICLR 2020, "Triple Wins", plus two):
  pgd-final    PGD on the final exit's loss.
  pgd-average  PGD on the average of the exits' losses.
  max-average  PGD on each exit's loss alone; per sample, the candidate with the highest
               average exit loss.
  exit-aware   PGD on the loss of the exit the input would take, the gate made smooth:
               exit k answers with weight g_k = s_k prod_{j<k} (1 - s_j), where
               s_k = sigmoid((t_k - H_k) / tau) is a soft "entropy H_k under threshold t_k",
               and the final exit with prod_j (1 - s_j). sum_k g_k CE_k is the deployed
               loss wherever no entropy is within a few tau of its threshold (exactly so as
               tau -> 0), and its gradient also moves inputs to an exit that gets them
               wrong, which the hard gate's gradient cannot see.
  square       Square (score-based, gradient-free) on the staged runtime's own logits.

Each report gives the robust accuracy (Wilson interval), the exits adversarial inputs take
and the MACs they cost: what an attacker can force, as a share of the single-pass model.
Every sample is attacked (a misclassified one counts as broken either way), so the exit
distribution covers the whole data set.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import onnx.utils
import torch
import torch.nn.functional as F  # noqa: N812 (the torch idiom)

from gdws_deploy.errors import GdwsError
from gdws_deploy.exits.split import open_staged
from gdws_deploy.ir.graph import load_model
from gdws_deploy.robustness.attacks import margin, pgd
from gdws_deploy.robustness.attacks.losses import Objective
from gdws_deploy.robustness.attacks.square import square
from gdws_deploy.robustness.data import Dataset
from gdws_deploy.robustness.evaluate import Progress, wilson_interval
from gdws_deploy.robustness.mirror import OnnxMirror
from gdws_deploy.runtime.staged import exit_taken

EXIT_ATTACKS = ("pgd-final", "pgd-average", "max-average", "exit-aware", "square")
Exits = Tuple[torch.Tensor, ...]


def exit_view(model: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """The single-output model that computes only `output` (to attack and judge one exit
    as an ordinary classifier)."""
    inputs = [value.name for value in model.graph.input]
    return onnx.utils.Extractor(model).extract_model(inputs, [output])


def exit_cross_entropies(exits: Sequence[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """(N, K) per-sample cross-entropy of every exit."""
    return torch.stack([F.cross_entropy(logits, y, reduction="none") for logits in exits], 1)


def weighted_exit_loss(weights: Sequence[float]) -> Objective:
    """The objective sum_k w_k CE(exit_k, y) per sample (RDI-Nets' training attack; with
    equal weights, the paper's attack on the average of exit losses)."""
    scale = torch.tensor([float(w) for w in weights])

    def exit_loss(exits: Exits, y: torch.Tensor) -> torch.Tensor:
        return exit_cross_entropies(exits, y) @ scale.to(y.device)

    return exit_loss


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Softmax entropy in nats per row (differentiable; runtime.staged.entropy in torch)."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(1)


def soft_gate(exits: Exits, thresholds: Sequence[float], tau: float) -> torch.Tensor:
    """(N, K) weights of each exit answering under the smooth gate (module docstring);
    rows sum to 1 and tend to the hard gate's one-hot choice as tau -> 0."""
    if not tau > 0:
        raise GdwsError(f"tau must be > 0, got {tau}")
    h = torch.stack([entropy(z) for z in exits[:-1]], 1)
    t = torch.tensor([float(v) for v in thresholds], dtype=h.dtype, device=h.device)
    leave = torch.sigmoid((t - h) / tau)
    stay = torch.cumprod(1 - leave, 1)
    reached = torch.cat([torch.ones_like(stay[:, :1]), stay[:, :-1]], 1)
    return torch.cat([leave * reached, stay[:, -1:]], 1)


@dataclass(frozen=True)
class ExitAttackSettings:
    """l_inf budget and effort: PGD steps (step default 2.5 eps / steps), the exit-aware
    gate's temperature tau (nats), Square's queries per sample."""

    eps: float = 4 / 255
    steps: int = 10
    step_size: Optional[float] = None
    tau: float = 0.1
    queries: int = 1000

    def check(self) -> None:
        if not (np.isfinite(self.eps) and self.eps > 0):
            raise GdwsError(f"eps must be > 0, got {self.eps}")
        for what, value in (("steps", self.steps), ("queries", self.queries)):
            if int(value) != value or value < 1:
                raise GdwsError(f"{what} must be a whole number >= 1, got {value}")
        if not self.tau > 0:
            raise GdwsError(f"tau must be > 0, got {self.tau}")

    @property
    def step(self) -> float:
        return 2.5 * self.eps / self.steps if self.step_size is None else self.step_size


class ExitJudge:
    """A multi-exit model opened twice: its torch mirror (all exits, the gradients) and
    its staged runtime (the verdicts, with its thresholds)."""

    def __init__(
        self,
        model: Union[str, Path],
        thresholds: Optional[Sequence[float]] = None,
        threads: int = 0,
    ) -> None:
        if Path(model).is_dir():
            raise GdwsError(
                f"{model} is a folder: the attacks need the whole multi-exit ONNX model "
                "(its mirror computes every exit)"
            )
        self.staged = open_staged(model, "ort", thresholds=thresholds, threads=threads)
        self.thresholds = self.staged.thresholds
        self.policy = self.staged.policy
        self.mirror = OnnxMirror(load_model(model).model)

    def __enter__(self) -> ExitJudge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.staged.close()

    @property
    def exit_count(self) -> int:
        return len(self.policy.outputs)

    def gated(self, exits: Exits) -> Tuple[torch.Tensor, np.ndarray]:
        """The logits the runtime's gate answers with, and the exit taken, per sample."""
        taken = exit_taken([z.detach().cpu().numpy() for z in exits], self.thresholds)
        stacked = torch.stack([z.detach() for z in exits], 1)
        index = torch.from_numpy(taken).to(stacked.device)
        return stacked[torch.arange(len(index), device=stacked.device), index], taken

    def deployed_margin(self, exits: Exits, y: torch.Tensor) -> torch.Tensor:
        return margin(self.gated(exits)[0], y)

    def runtime_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The staged runtime's answer as a torch tensor (what Square queries)."""
        logits, _ = self.staged.predict(x.detach().cpu().numpy())
        return torch.from_numpy(logits).to(x.device)

    def objective(self, name: str, settings: ExitAttackSettings) -> Objective:
        """The loss a gradient attack `name` ascends, on the mirror's exits."""
        count = self.exit_count
        if name == "pgd-final":
            return _named(
                "final_loss", lambda exits, y: F.cross_entropy(exits[-1], y, reduction="none")
            )
        if name == "pgd-average":
            return _named("average_loss", weighted_exit_loss([1 / count] * count))
        if name == "exit-aware":
            thresholds, tau = self.thresholds, settings.tau

            def exit_aware_loss(exits: Exits, y: torch.Tensor) -> torch.Tensor:
                gate = soft_gate(exits, thresholds, tau)
                return (gate * exit_cross_entropies(exits, y)).sum(1)

            return exit_aware_loss
        raise GdwsError(f"unknown exit attack {name!r} (choose from {', '.join(EXIT_ATTACKS)})")

    def attack(
        self,
        name: str,
        x: torch.Tensor,
        y: torch.Tensor,
        ids: torch.Tensor,
        settings: ExitAttackSettings,
        seed: int,
    ) -> torch.Tensor:
        """Adversarial inputs of attack `name` for the batch (x, y), sample ids `ids`."""
        if name == "square":
            found, _ = square(
                self.runtime_logits, x, y, settings.eps, settings.queries, sample_ids=ids, seed=seed
            )
            return found
        if name == "max-average":
            return self._max_average(x, y, ids, settings, seed)
        return self._pgd(self.objective(name, settings), x, y, ids, settings, seed)

    def _pgd(
        self,
        objective: Objective,
        x: torch.Tensor,
        y: torch.Tensor,
        ids: torch.Tensor,
        settings: ExitAttackSettings,
        seed: int,
    ) -> torch.Tensor:
        found, _ = pgd(
            self.mirror,
            x,
            y,
            "linf",
            settings.eps,
            settings.steps,
            settings.step,
            objective,
            True,
            ids,
            seed,
            margin_of=self.deployed_margin,
        )
        return found

    def _max_average(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        ids: torch.Tensor,
        settings: ExitAttackSettings,
        seed: int,
    ) -> torch.Tensor:
        count = self.exit_count
        candidates = torch.stack(
            [
                self._pgd(_exit_loss(k), x, y, ids, settings, seed)
                for k in range(count)  # one adversary per exit, K passes
            ],
            1,
        )
        average = weighted_exit_loss([1 / count] * count)
        with torch.no_grad():
            losses = torch.stack(
                [average(self.mirror(candidates[:, k]), y) for k in range(count)], 1
            )
        return candidates[torch.arange(len(x)), losses.argmax(1)]


def _named(name: str, objective: Objective) -> Objective:
    """`objective` under `name` (its __name__ keys PGD's random stream)."""

    def named(exits: Exits, y: torch.Tensor) -> torch.Tensor:
        return objective(exits, y)

    named.__name__ = name
    return named


def _exit_loss(k: int) -> Objective:
    return _named(f"exit_{k}_loss", lambda exits, y: F.cross_entropy(exits[k], y, reduction="none"))


@dataclass(frozen=True)
class ExitOutcome:
    """Inputs (clean, or one attack's) as the staged runtime judged them: accuracy with
    its 95 % Wilson interval, the share of samples leaving at each exit, the expected MACs
    per sample as a share of the single-pass model's, and (attacks) how many samples'
    answer the mirror's gated prediction got differently from the runtime."""

    name: str
    accuracy: float
    ci95: Tuple[float, float]
    exit_shares: Tuple[float, ...]
    expected_share: float
    disagreements: int = 0


@dataclass(frozen=True)
class ExitEvalReport:
    """clean, each attack, and the worst case per sample over the attacks (its compute:
    per sample, the most MACs any attack forced)."""

    model: str
    dataset: str
    samples: int
    outputs: Tuple[str, ...]
    thresholds: Tuple[float, ...]
    stage_macs: Tuple[int, ...]
    full_macs: int
    clean: ExitOutcome
    attacks: Tuple[ExitOutcome, ...]
    worst: ExitOutcome
    settings: Dict
    seed: int
    seconds: float

    def to_dict(self) -> Dict:
        return asdict(self)


@dataclass
class _Verdicts:
    """Per sample: right or not, the exit taken, and mirror/runtime disagreement."""

    correct: np.ndarray
    taken: np.ndarray
    disagree: np.ndarray


def evaluate_exits(
    model: Union[str, Path],
    dataset: Dataset,
    attacks: Sequence[str] = EXIT_ATTACKS,
    settings: ExitAttackSettings = ExitAttackSettings(),
    thresholds: Optional[Sequence[float]] = None,
    batch_size: int = 128,
    seed: int = 0,
    threads: int = 0,
    progress: Optional[Progress] = None,
) -> ExitEvalReport:
    """Attack the multi-exit ONNX `model` (thresholds from its metadata unless given) on
    `dataset` with each of `attacks`; verdicts from the staged runtime."""
    start = time.perf_counter()
    unknown = [name for name in attacks if name not in EXIT_ATTACKS]
    if unknown or not attacks:
        raise GdwsError(
            f"unknown exit attack {', '.join(unknown) or '(none given)'} "
            f"(choose from {', '.join(EXIT_ATTACKS)})"
        )
    settings.check()
    if batch_size < 1:
        raise GdwsError(f"batch size must be >= 1, got {batch_size}")
    with ExitJudge(model, thresholds, threads) as judge:
        with torch.no_grad():
            dataset.check_model(
                judge.mirror.input_shapes[0],
                lambda x: judge.mirror(torch.from_numpy(x))[-1].shape[1],
            )
        parts: List[List[_Verdicts]] = []
        for begin in range(0, len(dataset), batch_size):
            window = slice(begin, begin + batch_size)
            ids = torch.arange(len(dataset))[window]
            parts.append(
                _batch(judge, dataset.x[window], dataset.y[window], ids, attacks, settings, seed)
            )
            if progress is not None:
                progress(min(begin + batch_size, len(dataset)), len(dataset))
        runs = [_concat([part[i] for part in parts]) for i in range(len(attacks) + 1)]
        policy = judge.policy
        cost = np.asarray(policy.stage_macs, dtype=np.float64) / policy.full_macs
        clean = _outcome("clean", runs[0], cost)
        outcomes = [
            _outcome(name, _Verdicts(run.correct & runs[0].correct, run.taken, run.disagree), cost)
            for name, run in zip(attacks, runs[1:])
        ]
        robust = np.logical_and.reduce([runs[0].correct, *(run.correct for run in runs[1:])])
        forced = np.max([cost[run.taken] for run in runs[1:]], axis=0)
        worst = ExitOutcome(
            "worst case",
            *_accuracy(robust),
            (),
            float(forced.mean()),
            sum(outcome.disagreements for outcome in outcomes),
        )
        return ExitEvalReport(
            model=str(model),
            dataset=dataset.name,
            samples=len(dataset),
            outputs=tuple(policy.outputs),
            thresholds=tuple(judge.thresholds),
            stage_macs=tuple(policy.stage_macs),
            full_macs=policy.full_macs,
            clean=clean,
            attacks=tuple(outcomes),
            worst=worst,
            settings={**asdict(settings), "attacks": list(attacks)},
            seed=seed,
            seconds=time.perf_counter() - start,
        )


def _batch(
    judge: ExitJudge,
    x_batch: np.ndarray,
    y_batch: np.ndarray,
    ids: torch.Tensor,
    attacks: Sequence[str],
    settings: ExitAttackSettings,
    seed: int,
) -> List[_Verdicts]:
    """Verdicts on the clean batch, then on each attack's inputs."""
    x, y = torch.from_numpy(x_batch), torch.from_numpy(y_batch)
    inputs = [x, *(judge.attack(name, x, y, ids, settings, seed) for name in attacks)]
    verdicts = []
    for batch in inputs:
        logits, taken = judge.staged.predict(batch.detach().numpy())
        with torch.no_grad():
            mirrored, _ = judge.gated(judge.mirror(batch))
        answer = logits.argmax(1)
        verdicts.append(_Verdicts(answer == y_batch, taken, mirrored.argmax(1).numpy() != answer))
    return verdicts


def _concat(parts: Sequence[_Verdicts]) -> _Verdicts:
    return _Verdicts(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("correct", "taken", "disagree"))
    )


def _accuracy(correct: np.ndarray) -> Tuple[float, Tuple[float, float]]:
    right = int(correct.sum())
    return right / len(correct), wilson_interval(right, len(correct))


def _outcome(name: str, verdicts: _Verdicts, cost: np.ndarray) -> ExitOutcome:
    shares = np.bincount(verdicts.taken, minlength=len(cost)) / len(verdicts.taken)
    return ExitOutcome(
        name,
        *_accuracy(verdicts.correct),
        tuple(float(s) for s in shares),
        float(cost[verdicts.taken].mean()),
        int(verdicts.disagree.sum()),
    )
