"""Per-layer calibration: masked sensitivity equals sparse decoding, the
additive allocation is the exact optimum, the greedy allocation measures what
decoding with its β file would score, and scripts/calibrate.py meets its
target."""

import itertools
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from coreinfer_jax.offline import additive, greedy, joint_loss
from coreinfer_jax.eval import runners
from coreinfer_jax.core import gather
from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.model import forward as model
from coreinfer_jax.eval import tasks
from coreinfer_jax.model.cache import init_cache
from coreinfer_jax.core.spec import core_spec, read_beta_file
from coreinfer_jax.core.policy import Dense, Stability
from coreinfer_jax.core.cost import kept_rows_fraction
from coreinfer_jax.eval.scorer import ContinuationScorer, masked_params
from tests.conftest import REPO, WORDS, random_prompts, run_script


@pytest.fixture(scope="module")
def tiny(tiny_llama):
  return loading.load_model(tiny_llama, with_tokenizer=False)


def test_neuron_masks_equal_gathered_ffn(tiny):
  """Dropping neurons by a keep mask (evaluation, calibration) computes what
  the gathered compact FFN (decoding) computes; rows of a batch differ."""
  rng = np.random.default_rng(0)
  F = tiny.config.intermediate_size
  cores = [tuple(jnp.asarray(rng.choice(F, 40, replace=False)) for _ in tiny.params.layers)
           for _ in range(2)]
  keep = tuple(jnp.stack([jnp.zeros((F,)).at[c[i]].set(1.0) for c in cores])
               for i in range(len(tiny.params.layers)))
  tokens = jnp.asarray(random_prompts([12], seed=1) * 2)
  cache = init_cache(tiny.config, 2, 16, jnp.zeros((2,), jnp.int32), jnp.float32)
  masked, _ = model.forward(masked_params(tiny.params, keep), tiny.config, cache, tokens)
  for b, core in enumerate(cores):
    gathered = tiny.params.with_ffns(tuple(gather.gather_shared(layer.ffn, c)
                                           for layer, c in zip(tiny.params.layers, core)))
    one = init_cache(tiny.config, 1, 16, jnp.zeros((1,), jnp.int32), jnp.float32)
    expected, _ = model.forward(gathered, tiny.config, one, tokens[b:b + 1])
    np.testing.assert_allclose(masked[b:b + 1], expected, rtol=1e-5, atol=1e-5)


def _sensitivity(nll_LB, betas):
  L = nll_LB.shape[0]
  return additive.Sensitivity(tuple(betas), tuple(range(L)), np.asarray(nll_LB),
                                 np.zeros_like(nll_LB), 3.0, 100)


def test_loss_curves_do_not_depend_on_the_order_of_the_measured_betas():
  betas = (0.25, 0.5, 0.75)
  # Layer 0 is not monotone: its loss at β 0.5 is lifted to that at 0.75 (a loss
  # cannot shrink as β falls).
  nll = np.array([[0.9, 0.2, 0.3], [0.6, 0.4, 0.1]])
  ascending = additive.loss_curves(_sensitivity(nll, betas), "nll", 4)
  np.testing.assert_allclose(ascending, [[np.inf, 0.9, 0.3, 0.3, 0.0], [np.inf, 0.6, 0.4, 0.1, 0.0]])
  for order in itertools.permutations(range(3)):
    shuffled = _sensitivity(nll[:, order], [betas[i] for i in order])
    np.testing.assert_array_equal(additive.loss_curves(shuffled, "nll", 4), ascending)


def test_allocation_is_the_exact_optimum():
  rng = np.random.default_rng(4)
  betas = (0.25, 0.5, 0.75)
  # Convex-ish decreasing losses, different per layer.
  nll = np.sort(rng.uniform(0, 1, (4, 3)), axis=1)[:, ::-1] * rng.uniform(0.1, 2, (4, 1))
  sens = _sensitivity(nll, betas)
  steps, F = 4, 400   # options β ∈ {0.25, 0.5, 0.75, 1}: exactly the measured points
  for target in (0.4, 0.55, 0.7, 0.9):
    got = additive.allocate(sens, 4, F, target_ffn_fraction=target, steps=steps)
    options = list(betas) + [1.0]
    feasible = [(sum(nll[i, options.index(b)] if b < 1 else 0.0 for i, b in enumerate(choice)), choice)
                for choice in itertools.product(options, repeat=4) if np.mean(choice) <= target + 1e-9]
    best_loss, _ = min(feasible)
    assert got.predicted_loss == pytest.approx(best_loss)
    assert got.ffn_fraction <= target
  # max_loss: the smallest budget whose predicted loss fits.
  bound = 0.3
  got = additive.allocate(sens, 4, F, max_loss=bound, kind="kl", steps=steps)
  assert got.predicted_loss == 0.0 and got.ffn_fraction == 0.25  # kl all zero: cheapest wins
  got = additive.allocate(sens, 4, F, max_loss=np.expm1(bound), steps=steps)
  assert got.predicted_loss <= bound + 1e-12
  cheaper = [c for c in itertools.product(list(betas) + [1.0], repeat=4)
             if np.mean(c) < got.ffn_fraction - 1e-9
             and sum(nll[i, list(betas).index(b)] if b < 1 else 0 for i, b in enumerate(c)) <= bound]
  assert not cheaper


def test_allocation_errors():
  sens = _sensitivity(np.ones((2, 2)), (0.5, 0.8))
  with pytest.raises(ValueError, match="exactly one"):
    additive.allocate(sens, 2, 100)
  with pytest.raises(ValueError, match="below what the measured"):
    additive.allocate(sens, 2, 100, target_ffn_fraction=0.3)
  with pytest.raises(ValueError, match="unknown loss"):
    additive.allocate(sens, 2, 100, target_ffn_fraction=0.9, kind="ppl")


def _windows(seed=2):
  ids = random_prompts([96], seed=seed)[0]
  return tasks.token_windows(ids, 16, 16, 3)


@pytest.mark.parametrize("scoring", ["signed", "griffin"])
def test_greedy_measures_what_its_budgets_score(tiny, scoring):
  """The greedy allocation's measured loss (core sets as prefixes of one
  ranking) equals the perplexity the scorer gives its β file's core sets;
  every step lowers one layer by one step; it stops at the target."""
  windows = _windows()
  got = greedy.greedy_allocate(tiny.config, tiny.params, windows, scoring=scoring, alpha=0.2,
                                    target_ffn_fraction=0.7, steps=10, rows_per_pass=2,
                                    progress=False)
  F, L = tiny.config.intermediate_size, tiny.config.num_layers
  assert got.ffn_fraction <= 0.7 < got.trajectory[-2].ffn_fraction
  assert [s.ffn_fraction for s in got.trajectory] == sorted(
      (s.ffn_fraction for s in got.trajectory), reverse=True)
  assert len(got.trajectory) == round((1 - got.ffn_fraction) * 10 * L)
  layers = [i for i, b in enumerate(got.layer_beta) if b is not None]
  spec = core_spec(L, F, beta=[got.layer_beta[i] for i in layers], scoring=scoring,
                   sparse_layers=",".join(map(str, layers)))
  scorer = ContinuationScorer(tiny.config, tiny.params, [Dense(), Stability(spec, name="budget")],
                              cache_len=64, buckets=(16,), continuation_buckets=(16,))
  ppl = {r.method.name: r for r in runners.evaluate_perplexity(scorer, windows, progress=False)}
  nll = np.log(ppl["budget"].metrics["perplexity"] / ppl["dense"].metrics["perplexity"])
  assert got.measured_nll == pytest.approx(nll, abs=1e-4)
  assert got.measured_kl == pytest.approx(ppl["budget"].metrics["kl"], abs=1e-4)
  assert got.dense_nll == pytest.approx(np.log(ppl["dense"].metrics["perplexity"]), abs=1e-4)


def test_greedy_max_loss_stops_within_the_bound(tiny):
  windows = _windows(5)
  got = greedy.greedy_allocate(tiny.config, tiny.params, windows, scoring="signed", alpha=0.2,
                                    kind="kl", max_loss=0.02, steps=5, rows_per_pass=4,
                                    progress=False)
  assert 0 < got.measured_kl <= 0.02
  assert all(s.kl <= 0.02 for s in got.trajectory)
  # A looser bound goes further down.
  looser = greedy.greedy_allocate(tiny.config, tiny.params, windows, scoring="signed",
                                       alpha=0.2, kind="kl", max_loss=0.2, steps=5,
                                       rows_per_pass=4, progress=False)
  assert looser.ffn_fraction < got.ffn_fraction
  with pytest.raises(ValueError, match="below what min_beta"):
    greedy.greedy_allocate(tiny.config, tiny.params, windows, scoring="signed", alpha=0.2,
                                target_ffn_fraction=0.1, min_beta=0.5, steps=4, progress=False)
  with pytest.raises(ValueError, match="exactly one"):
    greedy.greedy_allocate(tiny.config, tiny.params, windows, scoring="signed", alpha=0.2)


def test_held_out_stop_measures_each_prefix(tiny):
  search = greedy.greedy_allocate(tiny.config, tiny.params, _windows(2), scoring="griffin",
                                       alpha=0.2, target_ffn_fraction=0.6, steps=5,
                                       rows_per_pass=4, progress=False)
  held = _windows(9)
  budgets = greedy.trajectory_budgets(search.trajectory, tiny.config.num_layers)
  assert budgets[-1] == search.layer_beta
  bound = 0.03
  stop = greedy.held_out_stop(tiny.config, tiny.params, held, search.trajectory,
                                   scoring="griffin", alpha=0.2, kind="kl", max_loss=bound,
                                   rows_per_pass=3)
  measure = joint_loss.JointLoss(tiny.config, tiny.params, held, scoring="griffin", alpha=0.2)
  nll, kl = measure([measure.kept(b) for b in budgets])
  np.testing.assert_allclose(stop.kl, kl, atol=1e-6)
  np.testing.assert_allclose(stop.nll, nll, atol=1e-6)
  assert stop.chosen == max([i + 1 for i, v in enumerate(kl) if v <= bound], default=0)
  assert 0 < stop.chosen < len(budgets)     # this bound stops the trajectory part way


def _calibrate(model_dir, out, *args):
  return run_script("calibrate.py", f"--model={model_dir}", f"--out={out}", *args, timeout=600)


@pytest.fixture
def calibration_text(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "greedy.txt"
  path.write_text(" ".join(rng.choice(WORDS, 400)))
  return str(path)


def test_calibrate_script_meets_the_target(tiny_llama_with_tokenizer, calibration_text, tmp_path):
  out = tmp_path / "beta.json"
  common = [f"--data={calibration_text}", "--windows=2", "--window_context=24",
            "--window_continuation=24", "--allocation=additive", "--betas=0.25,0.5,0.75",
            "--noprogress"]
  run = _calibrate(tiny_llama_with_tokenizer, out, *common, "--target_ffn_fraction=0.6", "--loss=kl")
  assert run.returncode == 0, run.stderr
  record = json.loads(out.read_text())
  betas = read_beta_file(str(out), 3)          # a valid β file
  assert record["ffn_fraction"] <= 0.6 and record["ffn_fraction"] > 0.5
  assert record["ffn_fraction"] == kept_rows_fraction(betas, 96)
  spec = core_spec(3, 96, beta_file=str(out))  # evaluate.py / generate.py read it as is
  assert sum(spec.layer_k[i] or 96 for i in range(3)) / (3 * 96) == record["ffn_fraction"]
  sens = np.asarray(record["sensitivity"]["kl"])
  assert sens.shape == (3, 3) and np.all(sens > 0)       # sparsifying one layer moves the output
  assert np.all(np.diff(sens, axis=1) < 0)                # keeping more neurons hurts less
  # Another target from the same measurements, without a model pass.
  again = _calibrate(tiny_llama_with_tokenizer, tmp_path / "b2.json", *common,
                     "--max_loss=0.5", f"--reuse_sensitivity={out}")
  assert again.returncode == 0, again.stderr
  assert json.loads((tmp_path / "b2.json").read_text())["predicted"]["perplexity_increase"] <= 0.5
  other = _calibrate(tiny_llama_with_tokenizer, tmp_path / "b3.json", *common[:-2],
                     "--betas=0.5", "--max_loss=0.5", f"--reuse_sensitivity={out}")
  assert other.returncode == 2 and "betas differ" in other.stderr


def test_calibrate_script_greedy(tiny_llama_with_tokenizer, calibration_text, tmp_path):
  out = tmp_path / "beta.json"
  run = _calibrate(tiny_llama_with_tokenizer, out, f"--data={calibration_text}", "--windows=2",
                   "--window_context=24", "--window_continuation=24", "--steps=10",
                   "--target_ffn_fraction=0.8", "--noprogress")
  assert run.returncode == 0, run.stderr
  record = json.loads(out.read_text())
  betas = read_beta_file(str(out), 3)
  assert record["ffn_fraction"] == kept_rows_fraction(betas, 96) <= 0.8
  assert record["calibration"]["allocation"] == "greedy"
  assert record["measured"]["nll"] == record["trajectory"][-1]["nll"]
  assert record["measured"]["perplexity_increase"] == pytest.approx(
      np.expm1(record["measured"]["nll"]))


def test_calibrate_script_held_out_stop_and_evaluation_overlap(tiny_llama_with_tokenizer,
                                                               calibration_text, tmp_path):
  out = tmp_path / "beta.json"
  common = [f"--data={calibration_text}", "--window_context=16", "--window_continuation=16",
            "--steps=5", "--loss=kl", "--noprogress"]
  run = _calibrate(tiny_llama_with_tokenizer, out, *common, "--windows=2", "--max_loss=1.0",
                   "--holdout_windows=2", "--holdout_skip_windows=2")
  assert run.returncode == 0, run.stderr
  record = json.loads(out.read_text())
  kept = record["holdout"]["steps_kept"]
  assert record["measured"]["on"] == "holdout" and record["measured"]["kl"] <= 1.0
  assert record["measured"]["kl"] == record["holdout"]["kl"][kept - 1]
  assert len(record["holdout"]["kl"]) == len(record["trajectory"])
  # Re-stopping the same trajectory with a tighter bound keeps fewer steps.
  again = tmp_path / "again.json"
  run = _calibrate(tiny_llama_with_tokenizer, again, *common, "--windows=2", "--max_loss=0.2",
                   "--holdout_windows=2", "--holdout_skip_windows=2", f"--reuse_trajectory={out}")
  assert run.returncode == 0, run.stderr
  tighter = json.loads(again.read_text())
  assert tighter["holdout"]["steps_kept"] <= kept
  assert tighter["trajectory"] == record["trajectory"]
  # With both: the search runs to the FFN target, the held-out loss stops it.
  both = tmp_path / "both.json"
  run = _calibrate(tiny_llama_with_tokenizer, both, *common, "--windows=2", "--max_loss=0.2",
                   "--target_ffn_fraction=0.5", "--holdout_windows=2", "--holdout_skip_windows=2")
  assert run.returncode == 0, run.stderr
  searched = json.loads(both.read_text())
  assert searched["trajectory"][-1]["ffn_fraction"] <= 0.5 < searched["trajectory"][-2]["ffn_fraction"]
  assert searched["measured"]["kl"] <= 0.2

  # evaluate.py refuses β files whose windows overlap the evaluated WikiText-2 windows.
  data = tmp_path / "data"
  (data / "wikitext2_raw").mkdir(parents=True)
  (data / "wikitext2_raw" / "wiki.test.raw").write_text(open(calibration_text).read())
  evaluate = lambda beta_file, windows: subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "evaluate.py"),
       f"--model={tiny_llama_with_tokenizer}", f"--data_dir={data}", "--tasks=wikitext",
       "--methods=dense", f"--beta_file={beta_file}", "--beta_file_scorings=griffin",
       "--window_context=16", "--window_continuation=16", f"--windows={windows}", "--noprogress",
       f"--json_out={tmp_path / 'e.json'}"], capture_output=True, text=True, timeout=600)
  overlap = evaluate(out, 3)
  assert overlap.returncode == 2 and "overlap" in overlap.stderr, overlap.stderr
  # Held-out windows 2-3 lie past 2 evaluated windows, but the search's windows 0-1 do not.
  assert "from token 0" in overlap.stderr
  searched_apart = tmp_path / "apart.json"
  run = _calibrate(tiny_llama_with_tokenizer, searched_apart, *common, "--windows=2",
                   "--skip_windows=4", "--max_loss=1.0", "--holdout_windows=2",
                   "--holdout_skip_windows=2")
  assert run.returncode == 0, run.stderr
  fine = evaluate(searched_apart, 2)
  assert fine.returncode == 0, fine.stderr
  methods = [r["method"] for r in json.loads((tmp_path / "e.json").read_text())["results"]]
  assert methods == ["dense", "beta_file:apart/griffin"]


@pytest.mark.parametrize("args, message", [
    (["--max_loss=0.1", "--target_ffn_fraction=0.5"], "exactly one"),
    (["--target_ffn_fraction=0.5", "--scoring=top"], "unknown scoring"),
    (["--target_ffn_fraction=0.5", "--windows=50"], "windows of 512 tokens"),
    (["--target_ffn_fraction=0.5", "--reuse_sensitivity=x.json"], "needs --allocation=additive"),
    (["--target_ffn_fraction=0.5", "--holdout_windows=2"], "needs --max_loss"),
    (["--max_loss=0.5", "--reuse_trajectory=x.json"], "needs --holdout_windows"),
    (["--max_loss=0.5", "--allocation=additive", "--holdout_windows=2"], "need --allocation=greedy"),
])
def test_calibrate_script_errors(tiny_llama_with_tokenizer, calibration_text, tmp_path, args, message):
  run = _calibrate(tiny_llama_with_tokenizer, tmp_path / "b.json", f"--data={calibration_text}",
                   *args)
  assert run.returncode == 2 and message in run.stderr, run.stderr
