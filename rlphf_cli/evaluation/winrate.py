"""Win / tie / loss tallies, win rate (a tie counts half) and a bootstrap 95% interval.

Outcomes are from system A's side: "win", "tie", "loss"; "invalid" is counted but left out of
the rate. The bootstrap resamples *units* with replacement, so the outcomes of one unit move together;
`rlphf judge` makes each prompt a unit, with all its combinations and criteria.
"""

from __future__ import annotations

from collections.abc import Sequence

SCORES = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def win_rate(wins: int, ties: int, losses: int) -> float | None:
    n = wins + ties + losses
    return (wins + 0.5 * ties) / n if n else None


def bootstrap_ci(units: Sequence[Sequence[float]], samples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of sum(scores) / count(scores) over units resampled with replacement."""
    import numpy as np

    units = [u for u in units if len(u)]
    if not units or samples <= 0:
        return None, None
    sums = np.array([sum(u) for u in units], dtype=float)
    counts = np.array([len(u) for u in units], dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(units), size=(samples, len(units)))
    rates = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(rates, [alpha, 1 - alpha])
    return float(low), float(high)


def summarize(outcomes: Sequence[tuple[str, str]], samples: int = 1000, seed: int = 0) -> dict:
    """`outcomes`: (unit, outcome) pairs. -> wins, ties, losses, invalid, n, win_rate, ci_low, ci_high."""
    counts = {"win": 0, "tie": 0, "loss": 0, "invalid": 0}
    units: dict[str, list[float]] = {}
    for unit, outcome in outcomes:
        counts[outcome] += 1
        if outcome in SCORES:
            units.setdefault(unit, []).append(SCORES[outcome])
    low, high = bootstrap_ci(list(units.values()), samples, seed)
    rate = win_rate(counts["win"], counts["tie"], counts["loss"])
    return {"wins": counts["win"], "ties": counts["tie"], "losses": counts["loss"], "invalid": counts["invalid"],
            "n": counts["win"] + counts["tie"] + counts["loss"],
            "win_rate": None if rate is None else round(rate, 4),
            "ci_low": None if low is None else round(low, 4), "ci_high": None if high is None else round(high, 4)}
