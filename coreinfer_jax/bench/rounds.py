"""Figures measured over rounds, reported so that they cannot contradict each other.

A `Figure` is one value per round (all non-negative), or no values and the
reason it could not be measured. It is reported as the min/median/max of its
rounds (`Spread`); the median is the figure. Figures combine round by round
(`summed`, `ratio`, `scaled`, `per_second`), so a sum of non-negative parts is, in every
round and therefore in each of min, median and max, at least each part.

Core selection runs inside the prefill, so it is only seen as a `difference`:
the selecting prefill minus a dense prefill of the same input. That difference
is measurable only when the two sets of rounds do not overlap (every selecting
round slower than every dense one): then every round's difference is positive.
Otherwise it is below the prefill's noise and reported as such (transformers'
decode time is the same kind of difference: 1 + N tokens minus 1). A speedup
above its bound is noise too (`within_bound`), reported with its rounds.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Dict, Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class Spread:
  """The least, median and greatest of a figure's rounds."""
  min: float
  median: float
  max: float


def spread_of(rounds: Sequence[float]) -> Spread:
  return Spread(min(rounds), statistics.median(rounds), max(rounds))


def format_spread(spread: Spread, digits: int, unit: str, scale: float = 1.0) -> str:
  """'4.9/5.2/6.0 ms' (min/median/max), or '5.2 ms' when every round is
  alike (one round); `unit` is appended as written."""
  values = (spread.median,) if spread.min == spread.max else (spread.min, spread.median, spread.max)
  return "/".join(f"{v * scale:.{digits}f}" for v in values) + unit


@dataclasses.dataclass(frozen=True)
class Figure:
  """One non-negative value per round, or (no rounds) why it is not measurable."""
  rounds: Tuple[float, ...] = ()
  reason: Optional[str] = None

  def __post_init__(self):
    if bool(self.rounds) == (self.reason is not None):
      raise ValueError("a figure has either rounds or the reason it has none")
    if any(v < 0 for v in self.rounds):
      raise ValueError(f"a measured figure cannot be negative: {self.rounds}")

  @property
  def spread(self) -> Optional[Spread]:
    return spread_of(self.rounds) if self.rounds else None

  @property
  def value(self) -> Optional[float]:
    return statistics.median(self.rounds) if self.rounds else None


def measured(rounds: Sequence[float]) -> Figure:
  return Figure(tuple(rounds))


def not_measurable(reason: str) -> Figure:
  return Figure(reason=reason)


def _round_by_round(a: Figure, b: Figure, op) -> Figure:
  """`op` of the two figures' rounds, or the first reason either has."""
  if not a.rounds or not b.rounds:
    return not_measurable(a.reason or b.reason)
  if len(a.rounds) != len(b.rounds):
    raise ValueError(f"{len(a.rounds)} rounds against {len(b.rounds)}")
  return measured([op(x, y) for x, y in zip(a.rounds, b.rounds)])


def summed(a: Figure, b: Figure) -> Figure:
  return _round_by_round(a, b, lambda x, y: x + y)


def ratio(a: Figure, b: Figure) -> Figure:
  return _round_by_round(a, b, lambda x, y: x / y)


def scaled(figure: Figure, factor: float) -> Figure:
  return measured([v * factor for v in figure.rounds]) if figure.rounds else figure


def per_second(count: float, seconds: Figure) -> Figure:
  """A rate: `count` over each round's seconds."""
  return measured([count / v for v in seconds.rounds]) if seconds.rounds else seconds


def difference(whole: Sequence[float], base: Sequence[float], noise_of: str) -> Figure:
  """Round by round `whole - base` (timings in seconds, paired by round), when
  every round of `whole` took longer than every round of `base`; otherwise
  not measurable, below the noise of `noise_of` (half the wider of the two
  sets' ranges). One round has no spread to judge by: it counts only when
  `whole` is at least twice `base` (a difference larger than the base itself,
  as a decode of many tokens against one)."""
  if len(whole) != len(base):
    raise ValueError(f"{len(whole)} rounds against {len(base)}")
  if len(whole) < 2:
    if whole[0] >= 2 * base[0]:
      return measured([whole[0] - base[0]])
    return not_measurable(f"one round cannot tell it from the {noise_of}'s noise")
  if min(whole) <= max(base):
    noise = max(max(rounds) - min(rounds) for rounds in (whole, base)) / 2
    return not_measurable(f"below the {noise_of}'s noise (±{noise * 1e3:.1f} ms over {len(whole)} "
                          f"rounds)")
  return measured([w - b for w, b in zip(whole, base)])


def within_bound(speedup: Figure, bound: float) -> Figure:
  """The speedup, or, when its median exceeds `bound` (the most it can be),
  not measurable: noise, with the spread of its rounds."""
  if speedup.rounds and speedup.value > bound:
    seen = (f"rounds {format_spread(speedup.spread, 2, 'x')} min/median/max"
            if len(speedup.rounds) > 1 else "one round")
    return not_measurable(f"{speedup.value:.3f}x is above its bound {bound:.3f}x: noise ({seen})")
  return speedup


def describe(name: str, figure: Figure, digits: int, unit: str, scale: float = 1.0) -> str:
  """'prefill 4.9/5.2/6.0 ms', or 'select: not measurable, <reason>'."""
  if figure.rounds:
    return f"{name} {format_spread(figure.spread, digits, unit, scale)}"
  return f"{name}: not measurable, {figure.reason}"


def fields(name: str, figure: Optional[Figure]) -> Dict[str, Any]:
  """JSON fields: `name` (the median, or None), `name_spread` (min, median,
  max, or None) and `name_reason` (why it is None; None when measured or
  when `figure` is None: the figure does not apply)."""
  if figure is None:
    return {name: None, f"{name}_spread": None, f"{name}_reason": None}
  spread = figure.spread
  return {name: figure.value, f"{name}_spread": None if spread is None else dataclasses.asdict(spread),
          f"{name}_reason": figure.reason}


def all_fields(figures: Dict[str, Optional[Figure]]) -> Dict[str, Any]:
  """`fields` of every (name, figure)."""
  return {k: v for name, figure in figures.items() for k, v in fields(name, figure).items()}


@dataclasses.dataclass(frozen=True)
class PrefillFigures:
  """A selecting prefill's figures, every one per round."""
  prefill: Figure          # the selecting prefill plus the gather
  dense_prefill: Figure
  select: Figure           # the selecting prefill minus the dense one
  gather: Figure
  select_gather: Figure
  select_gather_fraction: Figure   # of the dense prefill


def prefill_figures(selecting: Sequence[float], gather: Sequence[float],
                    dense: Sequence[float]) -> PrefillFigures:
  """From per-round seconds of the selecting prefill, the gather after it and
  a dense prefill of the same input (empty: not timed, then selection is not
  measurable)."""
  dense_figure = measured(dense) if dense else not_measurable("no dense prefill was timed")
  select = difference(selecting, dense, "prefill") if dense else dense_figure
  gather_figure = measured(gather)
  select_part = select if select.rounds else not_measurable(f"select: {select.reason}")
  select_gather = summed(select_part, gather_figure)
  return PrefillFigures(prefill=summed(measured(selecting), gather_figure),
                        dense_prefill=dense_figure, select=select, gather=gather_figure,
                        select_gather=select_gather,
                        select_gather_fraction=ratio(select_gather, dense_figure))


def describe_selection(figures: PrefillFigures) -> str:
  """'select + gather 3.1/3.4/3.9 ms (20/25/31% of the dense prefill); select
  ...; gather ...', or why selection is not measurable and the gather; only
  the gather when no dense prefill was timed."""
  gather = describe("gather", figures.gather, 1, " ms", 1e3)
  if not figures.dense_prefill.rounds:
    return gather
  select = describe("select", figures.select, 1, " ms", 1e3)
  if not figures.select.rounds:
    return f"{select}; {gather}"
  fraction = format_spread(figures.select_gather_fraction.spread, 0, "%", 100)
  return (f"{describe('select + gather', figures.select_gather, 1, ' ms', 1e3)} ({fraction} of the "
          f"dense prefill); {select}; {gather}")
