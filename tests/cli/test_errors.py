"""Bad input to the scripts fails early: one line, exit status 2."""

import json
import shutil

import pytest

from coreinfer_jax.checkpoint import NAMED_MODELS
from tests.checkpoint.test_gguf_reader import one_tensor_gguf, truncated_gguf
from tests.conftest import run_generate


@pytest.mark.parametrize("args, message", [
    (["--model=/no/such/model", "--prompt=hi"], "model path '/no/such/model' does not exist"),
    (["--prompt=hi", "--max_new_tokens=0"], "--max_new_tokens must be at least 1, got 0"),
    (["--prompt=hi", "--max_new_tokens=-5"], "--max_new_tokens must be at least 1, got -5"),
    (["--max_new_tokens=4"], "give exactly one of --prompt or --prompts_file"),
])
def test_generate_script_rejects_bad_input(args, message):
  proc = run_generate(*args)
  assert proc.returncode != 0
  assert message in proc.stderr


def test_generate_script_rejects_prompt_longer_than_cache(tiny_llama_with_tokenizer):
  folder = tiny_llama_with_tokenizer
  proc = run_generate(f"--model={folder}", "--prompt=" + "a b c d " * 40, "--cache_len=32",
                      "--max_new_tokens=4")
  assert proc.returncode == 2, proc.stderr
  assert "does not fit the cache length 32" in proc.stderr
  assert "[loaded" not in proc.stderr and proc.stdout == ""   # before the weights, no echo


def test_unsupported_config_in_folder_exits_nonzero(tiny_llama, tmp_path):
  folder = tmp_path / "unsupported"
  shutil.copytree(tiny_llama, folder)
  cfg = json.loads((folder / "config.json").read_text())
  cfg["hidden_act"] = "gelu"
  (folder / "config.json").write_text(json.dumps(cfg))
  proc = run_generate(f"--model={folder}", "--prompt=hi")
  assert proc.returncode == 2
  assert "'hidden_act'" in proc.stderr


def test_truncated_gguf_exits_2_in_one_line(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  path = tmp_path / "model.gguf"
  truncated_gguf(path)
  proc = run_generate(f"--model={path}", "--prompt=hi")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.splitlines()[-1].startswith(f"error: GGUF file '{path}' is truncated: ")
  assert proc.stderr.count("\n") == 1


def test_unsupported_gguf_architecture_exits_2_in_one_line(tmp_path):
  path = tmp_path / "phi.gguf"
  one_tensor_gguf(path, "phi3")
  proc = run_generate(f"--model={path}", "--prompt=hi")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip() == ("error: GGUF architecture 'phi3' is not supported "
                                 "(supported: llama, qwen2, gemma3)"), proc.stderr


def test_unknown_model_name_exits_2_listing_the_names(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  proc = run_generate("--model=no-such-name", "--prompt=hi")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr == ("error: model 'no-such-name' is neither a file or folder nor a named model "
                         f"(named: {', '.join(NAMED_MODELS)})\n")
