"""Calibration resumes exactly: a search interrupted after some steps (or
passes), restarted from what it saved, gives what an uninterrupted one gives."""

import dataclasses

import numpy as np
import pytest

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.eval import tasks
from coreinfer_jax.offline import additive, greedy
from tests.conftest import random_prompts


class Interrupted(Exception):
  pass


@pytest.fixture(scope="module")
def tiny(tiny_llama):
  return loading.load_model(tiny_llama, with_tokenizer=False)


@pytest.fixture(scope="module")
def windows():
  return tasks.token_windows(random_prompts([96], seed=3)[0], 16, 16, 2)


def _stop_after(count, saved):
  """An `on_step`/`on_pass` callback that saves, then interrupts on call `count`."""
  calls = []

  def callback(*measured):
    saved[:] = [list(m) for m in measured]
    calls.append(1)
    if len(calls) == count:
      raise Interrupted
  return callback


@pytest.mark.parametrize("interrupt_after", [1, 4])
def test_greedy_resumes_to_the_uninterrupted_allocation(tiny, windows, interrupt_after):
  settings = dict(scoring="griffin", alpha=0.2, target_ffn_fraction=0.75, steps=8,
                  rows_per_pass=3, progress=False)
  whole = greedy.greedy_allocate(tiny.config, tiny.params, windows, **settings)
  assert len(whole.trajectory) > interrupt_after
  saved = []
  with pytest.raises(Interrupted):
    greedy.greedy_allocate(tiny.config, tiny.params, windows, **settings,
                           on_step=_stop_after(interrupt_after, saved))
  (trajectory,) = saved
  assert len(trajectory) == interrupt_after
  steps = [greedy.GreedyStep(**dataclasses.asdict(s)) for s in trajectory]
  resumed = greedy.greedy_allocate(tiny.config, tiny.params, windows, **settings, resume=steps)
  assert resumed == whole


def test_greedy_resumed_at_its_end_reports_the_dense_loss(tiny, windows):
  settings = dict(scoring="signed", alpha=0.2, target_ffn_fraction=0.8, steps=4,
                  rows_per_pass=4, progress=False)
  whole = greedy.greedy_allocate(tiny.config, tiny.params, windows, **settings)
  resumed = greedy.greedy_allocate(tiny.config, tiny.params, windows, **settings,
                                   resume=whole.trajectory)
  assert resumed == whole and resumed.dense_nll > 0


@pytest.mark.parametrize("interrupt_after", [1, 2])
def test_sensitivity_resumes_to_the_uninterrupted_table(tiny, windows, interrupt_after):
  settings = dict(betas=[0.25, 0.5, 0.75], scoring="magnitude", alpha=0.2, rows_per_pass=4,
                  progress=False)
  whole = additive.measure_sensitivity(tiny.config, tiny.params, windows, **settings)
  saved = []
  with pytest.raises(Interrupted):
    additive.measure_sensitivity(tiny.config, tiny.params, windows, **settings,
                                 on_pass=_stop_after(interrupt_after, saved))
  nll, kl = saved
  assert len(nll) == len(kl) == 4 * interrupt_after   # whole passes only
  resumed = additive.measure_sensitivity(tiny.config, tiny.params, windows, **settings,
                                         measured=(nll, kl))
  np.testing.assert_array_equal(resumed.nll_LB, whole.nll_LB)
  np.testing.assert_array_equal(resumed.kl_LB, whole.kl_LB)
  assert resumed.dense_nll == whole.dense_nll and resumed.tokens == whole.tokens
