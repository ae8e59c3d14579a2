"""The lm-eval model's model_args: every one checked before any weights load, one line."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from coreinfer_jax import checkpoint   # noqa: E402
from coreinfer_jax.core import methods   # noqa: E402
from coreinfer_jax.eval import lm_eval_model   # noqa: E402
from coreinfer_jax.eval.lm_eval_model import CoreInferLM, ModelArgsError   # noqa: E402

# (model_args besides the model, the message after "coreinfer model_args: "),
# values as lm-eval's command line parses them (numbers, text, lists).
BAD_MODEL_ARGS = {
    "unknown argument": ({"bogus": 1}, "bogus=1: unknown argument; known: model, method, beta,"),
    "unknown method": ({"method": "sparse"}, "method=sparse: unknown method 'sparse'"),
    "beta above 1": ({"method": "stability", "beta": 1.5},
                     "beta=1.5: beta (kept fraction) must be in (0, 1], got 1.5"),
    "beta not a number": ({"method": "stability", "beta": "abc"},
                          "beta=abc: --beta 'abc': expected a number"),
    "beta count": ({"beta": [0.5, 0.4], "sparse_layers": "all"},
                   "beta=0.5,0.4: 2 per-layer β values for 3 sparsified layers"),
    "unknown scoring": ({"scoring": "best"}, "scoring=best: unknown scoring 'best'"),
    "layer out of range": ({"sparse_layers": [0, 7]},
                           "sparse_layers=0,7: sparse layers '0,7': layer index 7 is out of range"),
    "alpha not a number": ({"alpha": "abc"}, "alpha=abc: expected a number"),
    "missing beta_file": ({"beta_file": "/no/such/betas.json"}, "beta_file=/no/such/betas.json: "),
    "unknown dtype": ({"dtype": "float8"}, "dtype=float8: dtype 'float8': choose one of"),
    "cache_len not an integer": ({"cache_len": "abc"}, "cache_len=abc: expected a positive integer"),
    "similarity without clusters": ({"method": "similarity"},
                                    "cluster_dir=None: --method=similarity needs --cluster_dir"),
    "predictor without artefacts": ({"method": "predictor"},
                                    "predictor_dir=None: --method=predictor needs --predictor_dir"),
    "predictor artefacts missing": ({"method": "predictor", "predictor_dir": "/no/such/dir"},
                                    "predictor_dir=/no/such/dir: no predictor artefacts in "),
    "rolling context too long": ({"rolling_context": 600},
                                 "rolling_context=600: must be at most rolling_window (512)"),
}


@pytest.fixture
def no_weights_load(monkeypatch):
  def load_model(*args, **kwargs):
    raise AssertionError("weights loaded before the model_args were checked")
  monkeypatch.setattr(checkpoint, "load_model", load_model)


@pytest.mark.parametrize("model_args,message", BAD_MODEL_ARGS.values(), ids=BAD_MODEL_ARGS.keys())
def test_a_bad_model_arg_is_one_line_before_any_weights_load(tiny_llama, no_weights_load,
                                                            model_args, message):
  with pytest.raises(ModelArgsError) as error:
    CoreInferLM(model=tiny_llama, **model_args)
  assert str(error.value).startswith("coreinfer model_args: " + message)
  assert "\n" not in str(error.value)


def test_a_missing_model_path_is_one_line(tmp_path, no_weights_load):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(ModelArgsError, match=f"model={missing}: model path .* does not exist"):
    CoreInferLM(model=missing)


def test_model_args_as_lm_eval_passes_them(tiny_llama):
  checked = lm_eval_model.check_model_args(
      {"model": tiny_llama, "method": "stability", "beta": 0.5, "sparse_layers": [0, 2],
       "cache_len": "64", "batch_size": "auto:4", "device": "cuda:0", "trust_remote_code": True})
  assert checked.policy.spec.sparse_layers == (0, 2)
  assert checked.policy.spec.layer_beta[0] == 0.5
  assert (checked.args.cache_len, checked.args.batch_size) == (64, lm_eval_model.DEFAULT_BATCH_SIZE)
  assert sorted(lm_eval_model.SPEC_CHECK_ORDER) == sorted(methods.SPEC_SETTINGS)


@pytest.mark.parametrize("model_args,message", [
    ("method=stability,beta=1.5", "beta=1.5: beta (kept fraction) must be in (0, 1], got 1.5"),
    ("batch_size=4", "batch_size=4: set by lm-eval's --batch_size, not in model_args"),
])
def test_lm_evals_command_line_fails_in_one_line_before_its_tasks(tiny_llama, model_args,
                                                                  message):
  # A task lm-eval does not know: had the model_args been checked only once
  # lm-eval reached the model (after indexing its tasks, seconds), this run
  # would fail with lm-eval's "Tasks not found" traceback instead.
  proc = subprocess.run(
      [sys.executable, "-m", "coreinfer_jax.eval.lm_eval_model", "run", "--model",
       lm_eval_model.MODEL_NAME, "--model_args", f"model={tiny_llama},{model_args}",
       "--tasks", "no_such_task"],
      capture_output=True, text=True, timeout=300, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
  assert proc.returncode == lm_eval_model.EXIT_USAGE, proc.stderr
  assert proc.stderr == f"coreinfer model_args: {message}\n"
