"""The embedded SmolLM2-135M-Instruct GGUF against transformers' own GGUF loading."""

import json
import os
import subprocess
import sys

import chex
import jax.numpy as jnp
import pytest

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.checkpoint import params_from_hf_tensors
from tests.conftest import REPO, assert_greedy_matches_transformers

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,",
           "def fibonacci(n):"]


@pytest.fixture(scope="module")
def ours():
  return loading.load_model()


@pytest.fixture(scope="module")
def hf():
  from transformers import AutoModelForCausalLM
  path = loading.default_model_path()
  model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32)
  return model.eval()


def test_gguf_tensors_equal_transformers_gguf_loading(ours, hf):
  state = {k: (lambda v=v: v.numpy()) for k, v in hf.state_dict().items()}
  reference = params_from_hf_tensors(ours.config, state, jnp.float32)
  chex.assert_trees_all_close(ours.params, reference, rtol=0, atol=1e-6)


def test_greedy_generation_matches_transformers(ours, hf):
  assert_greedy_matches_transformers(ours, hf, PROMPTS, 32, stop_ids=(2,), min_tokens=20)


def test_gguf_tokenizer_matches_reference_tokenizer(ours):
  shared = os.environ.get("COREINFER_SHARED", os.path.join(REPO, "..", "shared"))
  ref_dir = os.path.join(shared, "reference", "smollm2-135m-instruct")
  if not os.path.isdir(ref_dir):
    pytest.skip(f"no reference tokenizer at {ref_dir}")
  from transformers import AutoTokenizer
  reference = AutoTokenizer.from_pretrained(ref_dir)
  for text in PROMPTS + ["Ünïcödé and   spaces\n\ttabs", "<|im_start|>user\nhi<|im_end|>"]:
    assert ours.tokenizer(text)["input_ids"] == reference(text)["input_ids"]


@pytest.mark.parametrize("method_args", [[], ["--method=stability", "--beta=0.4", "--scoring=magnitude"]])
def test_generate_script_end_to_end(tmp_path, method_args):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n")
  out = tmp_path / "out.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "generate.py"), f"--prompts_file={prompts}",
       "--max_new_tokens=8", f"--json_out={out}", "--cache_len=128", "--nostream", *method_args],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  payload = json.loads(out.read_text())
  assert payload["decode_compiles"] == 1   # three prompts, one bucket, one decode compile
  for record in payload["results"]:
    assert {"text", "token_ids", "prompt_tokens", "prefill_seconds", "decode_tokens_per_second",
            "decode_compiles", "select_gather_seconds", "ffn_bytes_fraction"} <= set(record)
    assert 0 < len(record["token_ids"]) <= 8 and record["text"]
  if method_args:   # SmolLM2: 30 layers, the paper range is 5..24, F = 1536
    assert payload["core"] == {"k": 614, "layers": list(range(5, 25)), "scoring": "magnitude",
                               "alpha": 0.2, "beta": 0.4, "blocks": 1, "sharing": "per_sequence", "top_m": "bisection"}
    assert all(r["ffn_bytes_fraction"] == pytest.approx(1 - 20 / 30 * (1 - 614 / 1536))
               for r in payload["results"])


def test_clusters_then_similarity_generation_on_truthfulqa(tmp_path):
  """cluster.py on real TruthfulQA questions, then generate.py with the clusters:
  five clusters as asked, every prompt assigned to one, decode compiled once."""
  data_dir = os.path.join(os.path.dirname(REPO), "shared", "data")
  if not os.path.isdir(data_dir):
    pytest.skip("../shared/data is not beside the checkout")
  clusters = tmp_path / "clusters"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "cluster.py"), "--dataset=truthfulqa",
       f"--data_dir={data_dir}", f"--out_dir={clusters}", "--limit=48", "--num_clusters=5",
       "--noprogress"], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  manifest = json.loads((clusters / "manifest.json").read_text())
  assert manifest["num_clusters"] == 5 and sum(manifest["cluster_sizes"]) == 48
  assert manifest["cluster_layer"] == 23 and manifest["cluster_k"] == 614
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n")
  out = tmp_path / "out.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "generate.py"), f"--prompts_file={prompts}",
       "--max_new_tokens=8", f"--json_out={out}", "--cache_len=128", "--nostream",
       "--method=similarity", f"--cluster_dir={clusters}"], capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr
  payload = json.loads(out.read_text())
  assert payload["decode_compiles"] == 1 and payload["method"] == "similarity"
  assert all(0 <= r["cluster_id"] < 5 and r["text"] for r in payload["results"])
