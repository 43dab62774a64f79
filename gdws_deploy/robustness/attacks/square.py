"""Square attack under l_inf (Andriushchenko et al. 2020): score-based random search that
only queries the model's logits, so gradient masking cannot hide from it. Start from
vertical stripes of +-eps; each query changes one random square window of every image to
a random +-eps per channel and keeps it where the margin drops. The window's area is a
fraction p of the image, p_init halved on the paper's schedule. Every query is one batched
forward pass over the samples not yet broken."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from gdws_deploy.robustness.attacks.losses import Model, margin
from gdws_deploy.robustness.attacks.seeding import stream

SQUARE_P_INIT = 0.8
# (schedule step in a 10000-query run, halvings of p after it): the paper's schedule,
# rescaled to the query budget
_HALVINGS = ((10, 1), (50, 2), (200, 3), (500, 4), (1000, 5), (2000, 6), (4000, 7), (6000, 8))
_HALVINGS += ((8000, 9),)
_RESAMPLES = 10  # redraws of a window that would not change the image


def square_fraction(p_init: float, query: int, queries: int) -> float:
    """The fraction of pixels the window covers at `query` of `queries`."""
    step = int(query / queries * 10000)
    halvings = sum(1 for start, _ in _HALVINGS if step > start)
    return p_init / 2**halvings


def square(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 8 / 255,
    queries: int = 5000,
    p_init: float = SQUARE_P_INIT,
    sample_ids: Optional[torch.Tensor] = None,
    seed: int = 0,
    restart: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lowest-margin inputs found within `queries` model queries per sample, margins)."""
    rng = stream("square-linf", x, sample_ids, seed, restart)
    _, channels, height, width = x.shape
    stripes = torch.where(rng.fork("init").uniform(channels, 1, width) < 0.5, -eps, eps)
    best = (x + stripes).clamp(0, 1)
    with torch.no_grad():
        best_margin = margin(model(best), y)
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    for query in range(1, queries):
        active = (best_margin >= 0).nonzero()[:, 0]
        if len(active) == 0:
            break
        fraction = square_fraction(p_init, query, queries)
        side = min(max(round(math.sqrt(fraction * height * width)), 1), height - 1)
        draw = rng.fork(query).subset(active)
        top = draw.fork("row").integers(torch.tensor(height - side + 1), 1)
        left = draw.fork("col").integers(torch.tensor(width - side + 1), 1)
        window = ((rows >= top) & (rows < top + side))[:, None, :, None] & (
            (cols >= left) & (cols < left + side)
        )[:, None, None, :]
        x_a, current = x[active], best[active]
        candidate = current
        for attempt in range(_RESAMPLES):  # redraw where the window would change nothing
            signs = draw.fork("sign", attempt).uniform(channels, 1, 1) < 0.5
            drawn = torch.where(window, x_a + torch.where(signs, -eps, eps), current).clamp(0, 1)
            unchanged = (drawn == current).flatten(1).all(1)
            stale = (candidate == current).flatten(1).all(1)
            candidate = torch.where((stale & ~unchanged)[:, None, None, None], drawn, candidate)
            if not (candidate == current).flatten(1).all(1).any():
                break
        with torch.no_grad():
            margins = margin(model(candidate), y[active])
        better = margins < best_margin[active]
        best_margin[active] = torch.where(better, margins, best_margin[active])
        best[active] = torch.where(better[:, None, None, None], candidate, current)
    return best, best_margin
