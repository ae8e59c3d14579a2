"""The command line as a user meets it, class by class: --help, flag errors,
output paths checked before any work, escape sequences, optional
dependencies, console entry points."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from coreinfer_jax.analysis import plots
from coreinfer_jax.cli import escapes, optional, outputs
from tests.conftest import REPO, run_generate, run_script

# Per script, flags its --help must list: its own, and a shared one it uses.
OWN_FLAGS = {
    "generate.py": ["--prompt", "--stop", "--model", "--beta", "--config"],
    "benchmark.py": ["--compare_hf", "--decode_steps", "--model", "--scoring"],
    "benchmark_scorer.py": ["--task", "--rounds", "--methods"],
    "calibrate.py": ["--allocation", "--out", "--model"],
    "cluster.py": ["--num_clusters", "--out_dir", "--dataset"],
    "importance.py": ["--out", "--dataset", "--scoring", "--resume"],
    "evaluate.py": ["--tasks", "--overwrite", "--json_out", "--model"],
    "merge_results.py": ["--inputs", "--within_loss"],
    "analyze.py": ["--analysis", "--out_dir", "--dataset"],
    "profile_decode.py": ["--repeats", "--shape", "--model", "--method"],
    "train_predictor.py": ["--rank", "--data", "--out_dir", "--sparse_layers", "--resume"],
}


@pytest.mark.parametrize("script", sorted(OWN_FLAGS))
def test_help_lists_the_scripts_own_flags_and_exits_0(script):
  proc = run_script(script, "--help")
  assert proc.returncode == 0, proc.stderr
  listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  --")}
  assert set(OWN_FLAGS[script]) <= listed, proc.stdout
  assert "--verbosity" not in listed   # absl's logging flags only in --helpfull


def test_flag_errors_exit_2_with_absls_suggestion():
  proc = run_generate("--betta=0.3")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: Unknown command line flag 'betta'. Did you mean: beta ? "
      "(--help lists this command's flags)"]
  proc = run_generate("--max_new_tokens=many")
  assert proc.returncode == 2 and "--max_new_tokens" in proc.stderr and "Traceback" not in proc.stderr


# (script, flag, kind): every output path a script writes.
OUTPUTS = [("generate.py", "json_out", "file"), ("evaluate.py", "json_out", "file"),
           ("evaluate.py", "markdown_out", "file"), ("evaluate.py", "plot", "file"),
           ("benchmark.py", "json_out", "file"), ("benchmark_scorer.py", "json_out", "file"),
           ("calibrate.py", "out", "file"), ("merge_results.py", "json_out", "file"),
           ("merge_results.py", "markdown_out", "file"), ("merge_results.py", "plot", "file"),
           ("profile_decode.py", "json_out", "file"), ("importance.py", "out", "file"),
           ("cluster.py", "out_dir", "folder"), ("analyze.py", "out_dir", "folder"),
           ("train_predictor.py", "out_dir", "folder")]


@pytest.mark.parametrize("script, flag, kind", OUTPUTS)
def test_output_paths_are_checked_before_any_work(script, flag, kind, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a folder")
  # A file output under a file, or a folder output that is a file.
  bad = a_file / "out.json" if kind == "file" else a_file
  proc = run_script(script, f"--{flag}={bad}")
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: --{flag}: {a_file} is a file"), lines
  assert proc.stdout == ""   # nothing ran: no model loaded, no table


@pytest.mark.parametrize("check, make, message", [
    (outputs.check_file, lambda p: p.mkdir(), "names a folder; give a file path"),
    (outputs.check_file, lambda p: p.parent.joinpath("x").write_text(""), "cannot write in"),
    (outputs.check_dir, lambda p: p.write_text(""), "is a file; give a folder"),
    (outputs.check_dir, lambda p: None, "cannot write in"),
])
def test_output_checks(check, make, message, tmp_path, monkeypatch):
  path = tmp_path / "target"
  make(path)
  if message == "cannot write in":   # root may write anywhere: deny as a read-only mount would
    monkeypatch.setattr(os, "access", lambda p, mode: False)
  with pytest.raises(OSError, match=message):
    check(str(path), "--out")


def test_a_file_output_named_as_a_folder_is_refused(tmp_path):
  with pytest.raises(IsADirectoryError, match="names a folder"):
    outputs.check_file(str(tmp_path / "results") + os.sep, "--json_out")


@pytest.mark.parametrize("name, image", [("frontier.png", "png"), ("frontier", "png"),
                                         ("f.PDF", "pdf"), ("f.svg", "svg"), ("f.txt", None)])
def test_plot_outputs_are_images(name, image, tmp_path):
  path = str(tmp_path / "new" / name)
  if image is None:
    with pytest.raises(ValueError, match="--plot: .* not .txt"):
      outputs.check_plot(path, "--plot")
    return
  outputs.check_plot(path, "--plot")
  records = [{"task": "t", "kind": kind, "family": kind, "ffn_bytes_fraction": f, "n": 4,
              "metrics": {"m": f}} for kind, f in (("dense", 1.0), ("stability", 0.5))]
  plots.frontier(records, path, "title")   # its folder is created; the format follows the extension
  magic = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}[image]
  assert open(path, "rb").read(5).startswith(magic)
  assert os.listdir(tmp_path / "new") == [name]   # no temporary left


def test_output_checks_accept_new_nested_paths(tmp_path):
  outputs.check_file(str(tmp_path / "new" / "deeper" / "out.json"), "--json_out")
  outputs.check_dir(str(tmp_path / "new" / "folder"), "--out_dir")
  assert not (tmp_path / "new").exists()   # checking creates nothing


@pytest.mark.parametrize("typed, meant", [
    (r"\n\n", "\n\n"), (r"a\tb", "a\tb"), (r"\\n", "\\n"), (r"C:\path", "C:\\path"),
    (r"\u00e9t\u00e9", "été"), ("été", "été"), (r"\x41\"", 'A"'), (r"\U0001F600", "\U0001F600"),
    ("plain", "plain"), (r"\theta", "\theta"), (r"\a\012", r"\a" + "\0" + "12"),
])
def test_escape_sequences(typed, meant):
  assert escapes.unescape(typed) == meant


@pytest.mark.parametrize("typed", [r"\UFFFFFFFF", r"a \ud800", r"\udfff"])
def test_escapes_that_name_no_character_are_refused(typed):
  with pytest.raises(ValueError, match="is not a character"):
    escapes.unescape(typed)


def test_escapes_reach_stop_strings_and_prompts(tiny_llama_with_tokenizer, tmp_path):
  """A stop string typed as \\uXXXX escapes stops where its characters are
  generated; a prompt of escaped whitespace is empty."""
  model = f"--model={tiny_llama_with_tokenizer}"
  common = [model, "--prompt=a b the of c", "--max_new_tokens=24", "--cache_len=64", "--nostream"]
  free = tmp_path / "free.json"
  assert run_generate(*common, f"--json_out={free}").returncode == 0
  text = json.loads(free.read_text())["text"]
  cut = next(i for i in range(3, len(text) - 1) if text[i] != " ")
  typed = "".join(f"\\u{ord(c):04x}" for c in text[cut:cut + 2])
  stopped = tmp_path / "stopped.json"
  proc = run_generate(*common, f"--stop={typed}", f"--json_out={stopped}")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(stopped.read_text())
  assert result["finish_reason"] == "stop_string" and result["text"] == text[:text.index(text[cut:cut + 2])]
  proc = run_generate(model, r"--prompt=\n\t ")
  assert proc.returncode == 2 and proc.stderr.strip() == "error: --prompt is empty"
  proc = run_generate(model, r"--prompt=a \ud800")
  assert proc.returncode == 2 and proc.stderr.strip() == (
      r"error: --prompt: \ud800 is not a character (a code point beyond U+10FFFF or a lone "
      "surrogate)")
  # --noescapes: the same prompt is a backslash, an n, a backslash, a t: not empty.
  proc = run_generate(model, r"--prompt=\n\t ", "--noescapes", *common[2:])
  assert proc.returncode == 0, proc.stderr


def run_without_torch(command, *args):
  """Runs a command with torch hidden from the import system (as if not installed)."""
  code = ("import sys; sys.modules['torch'] = None; "
          f"from coreinfer_jax.cli.launch import {command}; {command}()")
  return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                        timeout=300, cwd=REPO)


def test_missing_optional_dependency_fails_at_start_with_the_pip_command(tiny_llama):
  proc = run_without_torch("benchmark", f"--model={tiny_llama}", "--compare_hf")
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("error: --compare_hf needs the torch package, which is not "
                                 f"installed: pip install {optional.TORCH}")
  assert proc.stdout == ""   # before the model loaded and the probe ran


def test_console_entry_points_are_installed():
  """`pip install -e .` puts every command on PATH, beside scripts/."""
  for script in OWN_FLAGS:
    name = "coreinfer-" + script[:-3].replace("_", "-")
    assert shutil.which(name), f"{name} is not installed (pip install -e .)"
  proc = subprocess.run(["coreinfer-generate", "--help"], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "--prompt" in proc.stdout


def test_no_transformers_banner_without_torch(tiny_llama_with_tokenizer):
  """transformers advises on import that PyTorch is missing; the commands use
  only its tokenizers, so a first install (no torch) must not print it."""
  proc = run_without_torch("generate", f"--model={tiny_llama_with_tokenizer}", "--prompt=a b",
                           "--max_new_tokens=2", "--cache_len=32")
  assert proc.returncode == 0, proc.stderr
  assert "PyTorch" not in proc.stderr and "Traceback" not in proc.stderr
