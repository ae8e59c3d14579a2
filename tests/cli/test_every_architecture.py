"""Every script runs on every FFN family, not only the Llama that most tests
use: the tiny Gemma 3 (GeGLU, sandwich norms, windowed layers) goes through
clustering, similarity and stability generation, calibration, evaluation,
the analyses and the benchmark."""

import json

import numpy as np
import pytest

from tests.conftest import WORDS, make_tiny_hf_model, run_script, with_tokenizer


def _run(script, *args):
  proc = run_script(script, *args, timeout=600)
  assert proc.returncode == 0, f"{script}: {proc.stderr}"
  return proc


@pytest.mark.parametrize("name", ["gemma3"])
def test_every_script_runs(name, tmp_path):
  model_dir = tmp_path / "plain"
  make_tiny_hf_model(name).save_pretrained(model_dir)
  model = f"--model={with_tokenizer(model_dir, tmp_path / 'model')}"
  rng = np.random.default_rng(0)
  texts = tmp_path / "texts.jsonl"
  with open(texts, "w") as fh:
    for n in range(24):
      fh.write(json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(3, 10))),
                           "group": f"g{n % 2}"}) + "\n")
  data = tmp_path / "data" / "wikitext2_raw"
  data.mkdir(parents=True)
  (data / "wiki.test.raw").write_text(" ".join(rng.choice(WORDS, 600)))

  clusters = tmp_path / "clusters"
  _run("cluster.py", model, f"--dataset={texts}", f"--out_dir={clusters}", "--num_clusters=2",
       "--holdout_fraction=0.25", "--noprogress")
  for method in (["--method=similarity", f"--cluster_dir={clusters}"],
                 ["--method=stability", "--beta=0.5", "--scoring=griffin"]):
    out = tmp_path / "generated.json"
    _run("generate.py", model, "--prompt=a b the of c", "--max_new_tokens=4", "--cache_len=64",
         "--nostream", f"--json_out={out}", *method)
    assert json.loads(out.read_text())["ffn_bytes_fraction"] < 1   # one prompt: one record

  beta_file = tmp_path / "beta.json"
  _run("calibrate.py", model, f"--out={beta_file}", f"--data={data / 'wiki.test.raw'}",
       "--windows=2", "--skip_windows=4", "--window_context=24", "--window_continuation=24",
       "--target_ffn_fraction=0.8", "--noprogress")
  evaluated = tmp_path / "eval.json"
  _run("evaluate.py", model, f"--data_dir={tmp_path / 'data'}", "--tasks=wikitext",
       "--methods=dense,stability", "--betas=0.5", "--layer_sets=all", f"--beta_file={beta_file}",
       "--window_context=24", "--window_continuation=24", "--windows=2", "--noprogress",
       f"--json_out={evaluated}")
  results = json.loads(evaluated.read_text())["results"]
  assert len(results) == 3 and all(np.isfinite(r["metrics"]["perplexity"]) for r in results)

  for analysis in (["--analysis=stability", f"--dataset={texts}", "--limit=8", "--num_steps=3"],
                   ["--analysis=clusters", f"--cluster_dir={clusters}"]):
    _run("analyze.py", model, f"--out_dir={tmp_path / 'analysis'}", *analysis)

  bench = tmp_path / "bench.json"
  _run("benchmark.py", model, "--methods=dense,stability", "--betas=0.5", "--sparse_layers=all",
       "--prompt_len=8", "--cache_len=32", "--decode_steps=2", "--rounds=1", f"--json_out={bench}")
  assert json.loads(bench.read_text())
