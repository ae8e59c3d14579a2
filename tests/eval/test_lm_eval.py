"""The lm-eval model `coreinfer_jax` end to end on tiny local tasks."""

import json

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from coreinfer_jax.eval import runners   # noqa: E402
from coreinfer_jax.checkpoint import load as loading   # noqa: E402
from coreinfer_jax.eval import tasks   # noqa: E402
from coreinfer_jax.core.spec import core_spec   # noqa: E402
from coreinfer_jax.core.policy import Stability   # noqa: E402
from coreinfer_jax.eval.scorer import ContinuationScorer   # noqa: E402
from tests.conftest import WORDS   # noqa: E402


CHOICE_TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GENERATION_TASK = """task: tiny_generation
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: generate_until
validation_split: validation
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{choices[gold]}}}}"
generation_kwargs:
  until: ["of"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


def _examples(n, seed=0):
  rng = np.random.default_rng(seed)
  return [tasks.ChoiceExample(" ".join(rng.choice(WORDS, 6)),
                              tuple(" " + " ".join(rng.choice(WORDS, int(rng.integers(1, 5))))
                                    for _ in range(3)), int(rng.integers(0, 3)))
          for _ in range(n)]


@pytest.fixture
def task_dir(tmp_path):
  examples = _examples(12)
  data = tmp_path / "docs.jsonl"
  data.write_text("".join(json.dumps({"context": e.context, "choices": list(e.choices),
                                      "gold": e.gold}) + "\n" for e in examples))
  (tmp_path / "tiny_choice.yaml").write_text(CHOICE_TASK.format(path=data))
  (tmp_path / "tiny_generation.yaml").write_text(GENERATION_TASK.format(path=data))
  return tmp_path, examples


def test_simple_evaluate_on_a_local_task(tiny_llama_with_tokenizer, task_dir, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager

  import coreinfer_jax.eval.lm_eval_model   # noqa: F401  registers "coreinfer_jax"
  folder, examples = task_dir
  model_args = f"model={tiny_llama_with_tokenizer},method=stability,beta=0.5,sparse_layers=all"
  out = simple_evaluate(model="coreinfer_jax", model_args=model_args,
                        tasks=["tiny_choice", "tiny_generation"],
                        task_manager=TaskManager(include_path=str(folder)), limit=None)
  acc = out["results"]["tiny_choice"]["acc,none"]
  acc_norm = out["results"]["tiny_choice"]["acc_norm,none"]
  assert "exact_match,none" in out["results"]["tiny_generation"]

  # The same numbers as this project's own evaluation of the same examples.
  m = loading.load_model(str(tiny_llama_with_tokenizer))
  spec = core_spec(3, m.config.intermediate_size, beta=0.5, sparse_layers="all")
  scorer = ContinuationScorer(m.config, m.params, [Stability(spec, name="s")])
  ours = runners.evaluate_choices(scorer, m.tokenizer, examples, "tiny", progress=False)[0]
  assert acc == pytest.approx(ours.metrics["acc"])
  assert acc_norm == pytest.approx(ours.metrics["acc_norm"])


def test_loglikelihood_rolling_and_errors(tiny_llama_with_tokenizer):
  from lm_eval.api.instance import Instance

  from coreinfer_jax.eval.lm_eval_model import CoreInferLM
  lm = CoreInferLM(model=str(tiny_llama_with_tokenizer), method="stability", beta="0.5",
                   sparse_layers="all", rolling_window=8, rolling_context=4)
  dense = CoreInferLM(model=str(tiny_llama_with_tokenizer), rolling_window=8, rolling_context=4)
  text = " ".join(np.random.default_rng(1).choice(WORDS, 30))
  request = [Instance("loglikelihood_rolling", {}, (text,), 0)]
  sparse_ll, = lm.loglikelihood_rolling(request)
  dense_ll, = dense.loglikelihood_rolling(request)
  assert np.isfinite(sparse_ll) and sparse_ll < 0 and sparse_ll != dense_ll
  generate = [Instance("generate_until", {}, ("a b", {"do_sample": True, "temperature": 1.0}), 0)]
  with pytest.raises(ValueError, match="greedily"):
    lm.generate_until(generate)
  with pytest.raises(ValueError, match="unknown method"):
    CoreInferLM(model=str(tiny_llama_with_tokenizer), method="sparse")
