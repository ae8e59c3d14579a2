"""Per-layer calibration: masked sensitivity equals sparse decoding, the
allocation is the exact optimum, and scripts/calibrate.py meets its target."""

import itertools
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from coreinfer_jax import calibration, gather, loading, model
from coreinfer_jax.cache import init_cache
from coreinfer_jax.core import core_spec, read_beta_file
from tests.conftest import REPO, random_prompts

WORDS = "a b c d e f g h the of and to".split()


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
  masked, _ = model.forward(tiny.params, tiny.config, cache, tokens, ffn_keep=keep)
  for b, core in enumerate(cores):
    gathered = gather.with_compact_ffn(tiny.params, gather.gather_core(tiny.params, core))
    one = init_cache(tiny.config, 1, 16, jnp.zeros((1,), jnp.int32), jnp.float32)
    expected, _ = model.forward(gathered, tiny.config, one, tokens[b:b + 1])
    np.testing.assert_allclose(masked[b:b + 1], expected, rtol=1e-5, atol=1e-5)


def _sensitivity(nll_LB, betas):
  L = nll_LB.shape[0]
  return calibration.Sensitivity(tuple(betas), tuple(range(L)), np.asarray(nll_LB),
                                 np.zeros_like(nll_LB), 3.0, 100)


def test_allocation_is_the_exact_optimum():
  rng = np.random.default_rng(4)
  betas = (0.25, 0.5, 0.75)
  # Convex-ish decreasing losses, different per layer.
  nll = np.sort(rng.uniform(0, 1, (4, 3)), axis=1)[:, ::-1] * rng.uniform(0.1, 2, (4, 1))
  sens = _sensitivity(nll, betas)
  steps, F = 4, 400   # options β ∈ {0.25, 0.5, 0.75, 1}: exactly the measured points
  for target in (0.4, 0.55, 0.7, 0.9):
    got = calibration.allocate(sens, 4, F, target_ffn_fraction=target, steps=steps)
    options = list(betas) + [1.0]
    feasible = [(sum(nll[i, options.index(b)] if b < 1 else 0.0 for i, b in enumerate(choice)), choice)
                for choice in itertools.product(options, repeat=4) if np.mean(choice) <= target + 1e-9]
    best_loss, _ = min(feasible)
    assert got.predicted_loss == pytest.approx(best_loss)
    assert got.ffn_fraction <= target
  # max_loss: the smallest budget whose predicted loss fits.
  bound = 0.3
  got = calibration.allocate(sens, 4, F, max_loss=bound, kind="kl", steps=steps)
  assert got.predicted_loss == 0.0 and got.ffn_fraction == 0.25  # kl all zero: cheapest wins
  got = calibration.allocate(sens, 4, F, max_loss=np.expm1(bound), steps=steps)
  assert got.predicted_loss <= bound + 1e-12
  cheaper = [c for c in itertools.product(list(betas) + [1.0], repeat=4)
             if np.mean(c) < got.ffn_fraction - 1e-9
             and sum(nll[i, list(betas).index(b)] if b < 1 else 0 for i, b in enumerate(c)) <= bound]
  assert not cheaper


def test_allocation_errors():
  sens = _sensitivity(np.ones((2, 2)), (0.5, 0.8))
  with pytest.raises(ValueError, match="exactly one"):
    calibration.allocate(sens, 2, 100)
  with pytest.raises(ValueError, match="below what the measured"):
    calibration.allocate(sens, 2, 100, target_ffn_fraction=0.3)
  with pytest.raises(ValueError, match="unknown loss"):
    calibration.allocate(sens, 2, 100, target_ffn_fraction=0.9, kind="ppl")


def _calibrate(model_dir, out, *args):
  return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "calibrate.py"),
                         f"--model={model_dir}", f"--out={out}", *args],
                        capture_output=True, text=True, timeout=600)


@pytest.fixture
def calibration_text(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "calibration.txt"
  path.write_text(" ".join(rng.choice(WORDS, 400)))
  return str(path)


def test_calibrate_script_meets_the_target(tiny_llama_with_tokenizer, calibration_text, tmp_path):
  out = tmp_path / "beta.json"
  common = [f"--data={calibration_text}", "--windows=2", "--window_context=24",
            "--window_continuation=24", "--betas=0.25,0.5,0.75", "--noprogress"]
  run = _calibrate(tiny_llama_with_tokenizer, out, *common, "--target_ffn_fraction=0.6", "--loss=kl")
  assert run.returncode == 0, run.stderr
  record = json.loads(out.read_text())
  betas = read_beta_file(str(out), 3)          # a valid β file
  assert record["ffn_fraction"] <= 0.6 and record["ffn_fraction"] > 0.5
  assert record["ffn_fraction"] == calibration.ffn_fraction(betas, 96)
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


@pytest.mark.parametrize("args, message", [
    (["--max_loss=0.1", "--target_ffn_fraction=0.5"], "exactly one"),
    (["--target_ffn_fraction=0.5", "--scoring=top"], "unknown scoring"),
    (["--target_ffn_fraction=0.5", "--windows=50"], "windows of 512 tokens"),
])
def test_calibrate_script_errors(tiny_llama_with_tokenizer, calibration_text, tmp_path, args, message):
  run = _calibrate(tiny_llama_with_tokenizer, tmp_path / "b.json", f"--data={calibration_text}",
                   *args)
  assert run.returncode == 2 and message in run.stderr, run.stderr
