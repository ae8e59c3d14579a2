"""Every script honours `--config`: a named config's keys set the flags the
command line does not, and a flag given on the command line wins."""

import json
import subprocess
import sys

import pytest

from tests.conftest import run_script


def _configs(tmp_path, settings):
  folder = tmp_path / "configs"
  folder.mkdir()
  (folder / "mine.json").write_text(json.dumps(settings))
  return [f"--configs_dir={folder}", "--config=mine"]


# Per script: a named config whose values the script must reject, and the
# one-line error that shows it read them (each fails before any weights load).
CASES = {
    "generate.py": ({"max_new_tokens": 0, "prompt": "a b"},
                    "--max_new_tokens must be at least 1, got 0"),
    "benchmark.py": ({"rounds": 0}, "--decode_steps, --rounds, --prompt_len and --batch_size must be "
                                     "at least 1"),
    "evaluate.py": ({"tasks": ["no_such_task"], "data_dir": "."}, "unknown task 'no_such_task'"),
    "calibrate.py": ({"out": "beta.json", "data": "/no/such/calibration.txt"},
                     "'/no/such/calibration.txt': a calibration text file is required"),
    "cluster.py": ({"cluster_layer": 99, "out_dir": "clusters"}, "--cluster_layer 99 is out of range"),
    "analyze.py": ({"analysis": "clusters", "out_dir": "out"},
                   "--analysis=clusters needs --cluster_dir"),
    "merge_results.py": ({"inputs": ["/no/such/run.json"], "json_out": "merged.json"},
                         "/no/such/run.json"),
    "benchmark_scorer.py": ({"task": "no_such_task"}, "unknown task 'no_such_task'"),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_every_script_reads_its_named_config(script, tiny_llama_with_tokenizer, tmp_path):
  settings, message = CASES[script]
  model = [] if script == "merge_results.py" else [f"--model={tiny_llama_with_tokenizer}"]
  proc = run_script(script, *model, *_configs(tmp_path, settings))
  assert proc.returncode == 2, proc.stderr
  assert message in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_command_line_beats_the_named_config(tiny_llama_with_tokenizer, tmp_path):
  out = tmp_path / "out.json"
  proc = run_script("generate.py", f"--model={tiny_llama_with_tokenizer}", "--max_new_tokens=3",
                    "--cache_len=64", f"--json_out={out}", "--nostream",
                    *_configs(tmp_path, {"max_new_tokens": 0, "prompt": "a b c", "top_k": 5}))
  assert proc.returncode == 0, proc.stderr
  payload = json.loads(out.read_text())
  assert payload["prompt_tokens"] >= 3 and 1 <= len(payload["token_ids"]) <= 3


def test_a_missing_named_config_is_one_line(tmp_path):
  proc = run_script("merge_results.py", f"--configs_dir={tmp_path}", "--config=nope")
  assert proc.returncode == 2 and "no config named 'nope'" in proc.stderr


def test_the_lm_eval_model_needs_no_absl_flags():
  code = ("import sys, coreinfer_jax.eval.lm_eval_model; "
          "assert not [m for m in sys.modules if m.startswith('coreinfer_jax.cli')], 'cli imported'")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
