"""Timings that cannot contradict each other (issue #15): on synthetic rounds,
on a fake clock through the generator, and in a real run of benchmark.py.

Every printed or saved timing is non-negative with min <= median <= max; a
whole (select + gather) is at least each part in each of min, median and max,
or is not measurable with a reason; a speedup above its bound is flagged as
noise with its rounds' spread, never printed as a figure."""

import json
import os
import re
import subprocess
import sys

import pytest

from coreinfer_jax.bench import rounds
from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.core.policy import Stability
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.runtime.generator import GenerationStats, Generator
from tests.conftest import REPO, random_prompts

TRIPLE = re.compile(r"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)")


def _assert_printed_spreads_ordered(text):
  """Every min/median/max printed is ordered, and no printed number is negative."""
  for triple in TRIPLE.findall(text):
    low, middle, high = map(float, triple)
    assert low <= middle <= high, text
  assert not re.search(r"(?<!\w)-\d", text), text   # a minus sign, not "smollm2-135m"


def _assert_at_least(whole: rounds.Spread, part: rounds.Spread):
  assert whole.min >= part.min and whole.median >= part.median and whole.max >= part.max


def _assert_consistent(figures: rounds.PrefillFigures):
  """Parts non-negative, each whole at least each of its parts, or not
  measurable with a reason that reaches every figure built on it."""
  for figure in (figures.prefill, figures.gather, figures.select, figures.select_gather):
    assert all(v >= 0 for v in figure.rounds)
    assert (figure.value is None) == bool(figure.reason)
  if figures.select.rounds:
    _assert_at_least(figures.select_gather.spread, figures.select.spread)
    _assert_at_least(figures.select_gather.spread, figures.gather.spread)
    _assert_at_least(figures.prefill.spread, figures.select_gather.spread)
  else:
    assert figures.select.reason
    for derived in (figures.select_gather, figures.select_gather_fraction):
      assert derived.value is None and figures.select.reason in derived.reason
  _assert_printed_spreads_ordered(rounds.describe_selection(figures))
  _assert_printed_spreads_ordered(rounds.describe("prefill", figures.prefill, 1, " ms", 1e3))


MS = 1e-3


@pytest.mark.parametrize("selecting, gather, dense, reason", [
    # Every selecting round slower than every dense one: measurable.
    ([10 * MS, 11 * MS, 12 * MS], [1 * MS, 2 * MS, 1.5 * MS], [5 * MS, 6 * MS, 7 * MS], None),
    # A similarity run gathers only on its cluster's first use.
    ([10 * MS, 11 * MS, 12 * MS], [3 * MS, 0.0, 0.0], [5 * MS, 6 * MS, 7 * MS], None),
    # The two prefills overlap: the noise hides the selection.
    ([10 * MS, 12 * MS, 11 * MS], [1 * MS] * 3, [9 * MS, 11.6 * MS, 10 * MS], "noise (±1.3 ms over 3"),
    # Seen: "select + gather -37 ms": the dense prefill came out slower.
    ([600 * MS, 620 * MS, 610 * MS], [5 * MS] * 3, [640 * MS, 660 * MS, 650 * MS], "noise"),
    # Seen: "select + gather 10.5 ms" beside "gather 44.1 ms".
    ([100 * MS, 101 * MS, 99 * MS], [44.1 * MS] * 3, [135 * MS, 130 * MS, 140 * MS], "noise"),
    ([9 * MS], [1 * MS], [5 * MS], "one round cannot tell it"),
    ([10 * MS], [1 * MS], [4 * MS], None),   # one round, twice the base: a real difference
    ([10 * MS, 11 * MS], [1 * MS] * 2, [], "no dense prefill was timed"),
])
def test_selection_is_non_negative_and_below_its_whole_or_says_why(selecting, gather, dense, reason):
  figures = rounds.prefill_figures(selecting, gather, dense)
  _assert_consistent(figures)
  if reason is None:
    assert figures.select.rounds and figures.select_gather.rounds
  else:
    assert reason in figures.select.reason
    assert rounds.fields("select_gather_seconds", figures.select_gather)[
        "select_gather_seconds_reason"].startswith(f"select: {figures.select.reason}")


@pytest.mark.parametrize("ratios, bound, flagged", [
    ([1.10, 1.35, 1.52], 1.31, True),    # seen: "1.35x dense (bound 1.31x, 103% of it)"
    ([1.00, 1.20, 1.25], 1.31, False),
    ([1.40, 1.00, 1.00], 1.31, False),   # one noisy round above: the median is the figure
    ([1.00, 1.00, 1.00], 1.00, False),   # the dense run against itself
])
def test_a_speedup_above_its_bound_is_flagged_as_noise_with_its_spread(ratios, bound, flagged):
  speedup = rounds.within_bound(rounds.measured(ratios), bound)
  line = rounds.describe("speedup vs dense", speedup, 2, "x")
  _assert_printed_spreads_ordered(line)
  if flagged:
    assert speedup.value is None and "noise" in speedup.reason
    assert f"{min(ratios):.2f}/{sorted(ratios)[1]:.2f}/{max(ratios):.2f}x" in line
    assert rounds.fields("speedup_vs_dense", speedup)["speedup_vs_dense"] is None
  else:
    assert speedup.value <= bound and speedup.reason is None


def test_a_figure_is_never_negative_and_json_carries_its_spread():
  with pytest.raises(ValueError, match="cannot be negative"):
    rounds.measured([0.01, -0.002])
  saved = rounds.fields("prefill_seconds", rounds.measured([3.0, 1.0, 2.0]))
  assert saved == {"prefill_seconds": 2.0, "prefill_seconds_reason": None,
                   "prefill_seconds_spread": {"min": 1.0, "median": 2.0, "max": 3.0}}
  assert rounds.format_spread(rounds.spread_of([2.0]), 1, " ms") == "2.0 ms"


class FakeClock:
  """Each timed interval (two calls: its start and its end) lasts the next of
  `intervals` seconds."""

  def __init__(self, intervals):
    self.intervals = iter(intervals)
    self.now = 0.0
    self.calls = 0

  def __call__(self):
    self.calls += 1
    if self.calls % 2 == 0:
      self.now += next(self.intervals)
    return self.now


@pytest.fixture(scope="module")
def tiny(tiny_llama):
  return loading.load_model(tiny_llama, with_tokenizer=False)


@pytest.mark.parametrize("selecting, dense, measurable", [
    ([10 * MS, 12 * MS, 11 * MS], [4 * MS, 5 * MS, 6 * MS], True),
    ([10 * MS, 12 * MS, 11 * MS], [13 * MS, 9 * MS, 10 * MS], False),   # a dense round slower
])
def test_generator_times_selection_in_alternating_rounds(tiny, selecting, dense, measurable):
  spec = core_spec(tiny.config.num_layers, tiny.config.intermediate_size, beta=0.5,
                   sparse_layers="all")
  gather = 2 * MS
  # The order timed_prefill times in: selecting, gather, dense, then (selecting, dense) twice.
  order = [selecting[0], gather, dense[0], selecting[1], dense[1], selecting[2], dense[2]]
  gen = Generator(tiny.config, tiny.params, cache_len=64, policy=Stability(spec),
                  time_selection=True, selection_rounds=3, clock=FakeClock(order))
  (ids,) = random_prompts([9], seed=2)
  gen.compile_for(gen.params, 1, gen.bucket([ids], 4))
  stats = GenerationStats()
  gen.timed_prefill([ids], 4, stats)
  assert stats.selecting_prefill_rounds == pytest.approx(selecting)
  assert stats.dense_prefill_rounds == pytest.approx(dense)
  assert stats.gather_seconds == pytest.approx(gather)
  assert stats.prefill_seconds == pytest.approx(selecting[0] + gather)
  figures = rounds.prefill_figures(stats.selecting_prefill_rounds, [gather] * 3,
                                   stats.dense_prefill_rounds)
  _assert_consistent(figures)
  assert bool(figures.select.rounds) == measurable


def test_benchmark_prints_ordered_non_negative_spreads(tmp_path):
  """benchmark.py on random weights in SmolLM2's shape, cut to 2 layers."""
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "benchmark.py"), "--shape=smollm2-135m",
       "--num_layers=2", "--methods=dense,stability", "--betas=0.5", "--sparse_layers=all",
       "--prompt_len=16", "--cache_len=64", "--decode_steps=2", "--rounds=3", f"--json_out={out}"],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  headers = [line for line in lines if line.startswith(("dense (", "stability β=0.5"))]
  assert len(headers) == 2 and all("(min/median/max over 3 rounds)" in h for h in headers), proc.stdout
  probe_lines = [line for line in lines if line.startswith("  probe ")]
  assert {line.split()[1] for line in probe_lines} >= {"xla_matvec", "xla_stream", "numpy_matvec"}
  assert sum("<- the limit" in line for line in probe_lines) == 1
  assert any("select" in line for line in lines) and any("speedup vs dense" in line for line in lines)
  _assert_printed_spreads_ordered(proc.stdout)

  payload = json.loads(out.read_text())
  limits = payload["limits_gb_per_s"]
  assert payload["limit"] == max(limits, key=lambda name: limits[name]["gb_per_s"])
  for run in payload["runs"]:
    achieved = run["achieved_gb_per_s"] / limits[payload["limit"]]["gb_per_s"]
    assert run["fraction_of_limit"] == pytest.approx(achieved, rel=1e-6)
    for name, spread in run.items():
      if not name.endswith("_spread"):
        continue
      figure = name[:-len("_spread")]
      if spread is None:
        assert run[figure] is None
        continue
      assert 0 <= spread["min"] <= spread["median"] == run[figure] <= spread["max"]
      assert run[f"{figure}_reason"] is None
  sparse = payload["runs"][1]
  if sparse["select_seconds"] is None:
    assert "noise" in sparse["select_seconds_reason"]
    assert sparse["select_gather_seconds"] is None and sparse["select_gather_seconds_reason"]
  else:
    for part in ("select_seconds", "gather_seconds"):
      _assert_at_least(rounds.Spread(**sparse["select_gather_seconds_spread"]),
                       rounds.Spread(**sparse[f"{part}_spread"]))
  if sparse["speedup_vs_dense"] is None:
    assert "above its bound" in sparse["speedup_vs_dense_reason"]
  else:
    assert sparse["speedup_vs_dense"] <= sparse["bound_speedup"]
