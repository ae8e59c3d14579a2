"""Ctrl-C at each phase of the long commands, run as subprocesses with SIGINT:
one line saying what was saved, exit 130, no traceback; a rerun resumes
(evaluate: only the tasks not saved, and the JSON an uninterrupted run gives)."""

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.conftest import REPO, WORDS, run_script


class Running:
  """A Python process (`python -u ARGV`) started in the background, its output
  collected as it comes."""

  def __init__(self, *argv):
    self.proc = subprocess.Popen([sys.executable, "-u", *argv], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=REPO)
    self.stdout, self.stderr = [], []
    self.readers = [threading.Thread(target=self._read, args=(stream, out), daemon=True)
                    for stream, out in ((self.proc.stdout, self.stdout),
                                        (self.proc.stderr, self.stderr))]
    for reader in self.readers:
      reader.start()

  @staticmethod
  def script(name, *args):
    return Running(os.path.join(REPO, "scripts", name), *args)

  @staticmethod
  def _read(stream, out):
    for line in stream:
      out.append(line)

  def interrupt_when(self, ready, timeout=300):
    """Sends SIGINT once `ready()` holds; returns (exit status, stdout, stderr)."""
    deadline = time.monotonic() + timeout
    while not ready():
      assert self.proc.poll() is None, "finished before it could be interrupted:\n" + "".join(
          self.stderr)
      assert time.monotonic() < deadline, "never became ready:\n" + "".join(self.stderr)
      time.sleep(0.02)
    self.proc.send_signal(signal.SIGINT)
    status = self.proc.wait(timeout=120)
    for reader in self.readers:
      reader.join(timeout=10)
    return status, "".join(self.stdout), "".join(self.stderr)


def assert_interrupted(status, stderr, saved):
  assert status == 130, stderr
  assert "Traceback" not in stderr, stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("interrupted"), stderr
  assert (saved in last) if saved else "nothing was saved" in last, last
  return last


@pytest.fixture
def prompts_file(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "prompts.txt"
  path.write_text("\n".join(" ".join(rng.choice(WORDS, 5)) for _ in range(200)))
  return path


@pytest.mark.parametrize("phase", ["loaded", "generating"])
def test_generate_interrupted_at_each_phase(phase, tiny_llama_with_tokenizer, prompts_file,
                                            tmp_path):
  out = tmp_path / "out.json"
  run = Running.script("generate.py", f"--model={tiny_llama_with_tokenizer}",
                f"--prompts_file={prompts_file}", "--max_new_tokens=24", "--cache_len=64",
                "--nostream", f"--json_out={out}")
  ready = {"loaded": lambda: any(line.startswith("[loaded") for line in run.stderr),
           "generating": lambda: any(line.startswith("[prompt") for line in run.stderr)}[phase]
  status, _, stderr = run.interrupt_when(ready)
  if phase == "generating":   # the prompts finished so far are in the JSON
    assert_interrupted(status, stderr, saved=str(out))
    done = json.loads(out.read_text())["results"]
    assert 1 <= len(done) < 200 and all(r["finish_reason"] for r in done)
  else:
    assert_interrupted(status, stderr, saved=None)
    assert not out.exists()


# Runs a command whose import of JAX blocks until interrupted, after saying
# so: SIGINT lands while the command's module is being imported.
SLOW_JAX = """
import sys, time
from coreinfer_jax.cli import launch

class SlowJax:
  def find_spec(self, name, path=None, target=None):
    if name == "jax":
      print("importing jax", flush=True)
      time.sleep(60)
    return None

sys.meta_path.insert(0, SlowJax())
launch.launch(sys.argv[1])
"""


@pytest.mark.parametrize("command", ["generate", "evaluate", "cluster", "calibrate"])
def test_interrupted_while_starting(command):
  run = Running("-c", SLOW_JAX, command)
  status, _, stderr = run.interrupt_when(lambda: run.stdout == ["importing jax\n"])
  last = assert_interrupted(status, stderr, saved=None)
  assert last == "interrupted while starting: nothing was saved"


@pytest.fixture
def data_dir(tmp_path):
  rng = np.random.default_rng(1)
  (tmp_path / "data" / "wikitext2_raw").mkdir(parents=True)
  (tmp_path / "data" / "wikitext2_raw" / "wiki.test.raw").write_text(
      " ".join(rng.choice(WORDS, 400)))
  (tmp_path / "data" / "piqa").mkdir()
  with open(tmp_path / "data" / "piqa" / "valid.jsonl", "w") as fh:
    for _ in range(12):
      fh.write(json.dumps({"goal": " ".join(rng.choice(WORDS, 6)),
                           "sol1": " ".join(rng.choice(WORDS, 4)),
                           "sol2": " ".join(rng.choice(WORDS, 5))}) + "\n")
  (tmp_path / "data" / "piqa" / "valid-labels.lst").write_text("0\n1\n" * 6)
  return tmp_path / "data"


def _without_timing(path):
  record = json.loads(path.read_text())
  del record["timing"]
  return record


def test_evaluate_interrupted_after_its_first_task_resumes_the_rest(
    tiny_llama_with_tokenizer, data_dir, tmp_path):
  common = [f"--model={tiny_llama_with_tokenizer}", f"--data_dir={data_dir}",
            "--tasks=wikitext,piqa", "--methods=dense,stability", "--betas=0.5",
            "--window_context=24", "--window_continuation=24", "--windows=2",
            "--buckets=32,64", "--continuation_buckets=8,16,32", "--cache_len=96", "--noprogress"]
  out = tmp_path / "eval.json"
  run = Running.script("evaluate.py", *common, f"--json_out={out}")
  status, _, stderr = run.interrupt_when(out.exists)
  last = assert_interrupted(status, stderr, saved=str(out))
  assert "rerun the same command" in last
  assert [r["task"] for r in json.loads(out.read_text())["results"]] == ["wikitext"] * 2

  resumed = run_script("evaluate.py", *common, f"--json_out={out}")
  assert resumed.returncode == 0, resumed.stderr
  assert "wikitext done; to run: piqa" in resumed.stdout
  whole = tmp_path / "whole.json"
  assert run_script("evaluate.py", *common, f"--json_out={whole}").returncode == 0
  assert _without_timing(out) == _without_timing(whole)

  # Other settings are refused before any work, not silently overwritten.
  other = run_script("evaluate.py", *[a for a in common if not a.startswith("--betas")],
                     "--betas=0.25", f"--json_out={out}")
  assert other.returncode == 2
  assert other.stderr.strip() == (f"error: --json_out {out} holds results of other settings "
                                  "(betas differ): choose another path, or --overwrite to "
                                  "replace it")


def test_cluster_interrupted_keeps_finished_batches_and_resumes(tiny_llama_with_tokenizer,
                                                                 tmp_path):
  rng = np.random.default_rng(2)
  texts = tmp_path / "texts.txt"
  texts.write_text("\n".join(" ".join(rng.choice(WORDS, rng.integers(3, 12)))
                             for _ in range(300)))
  out_dir = tmp_path / "clusters"
  common = [f"--model={tiny_llama_with_tokenizer}", f"--dataset={texts}", f"--out_dir={out_dir}",
            "--num_clusters=2", "--batch_size=2", "--noprogress"]
  run = Running.script("cluster.py", *common)
  status, _, stderr = run.interrupt_when(
      lambda: bool(glob.glob(str(out_dir / ".partial-*" / "batch-*.npz"))))
  last = assert_interrupted(status, stderr, saved=str(out_dir / ".partial-"))
  assert "rerun the same command (without --noresume) to reuse the finished batches" in last
  resumed = run_script("cluster.py", *common)
  assert resumed.returncode == 0, resumed.stderr
  manifest = json.loads((out_dir / "manifest.json").read_text())
  assert manifest["batches"]["resumed"] >= 1
  assert manifest["batches"]["resumed"] + manifest["batches"]["computed"] == 150


def test_saved_work_of_other_settings_is_refused_not_overwritten(tiny_llama_with_tokenizer,
                                                                 data_dir, tmp_path):
  """A rerun never silently replaces what an earlier run saved: an evaluate.py
  --json_out that is not its output, a calibration's partial measurements of
  other settings (both refused before any weights load)."""
  foreign = tmp_path / "foreign.json"
  foreign.write_text("[1, 2]")
  proc = run_script("evaluate.py", f"--model={tiny_llama_with_tokenizer}", f"--data_dir={data_dir}",
                    "--tasks=wikitext", f"--json_out={foreign}")
  assert proc.returncode == 2 and proc.stderr.strip() == (
      f"error: --json_out {foreign} exists and is not an evaluate.py output: choose another "
      "path, or --overwrite to replace it")
  assert foreign.read_text() == "[1, 2]"

  out = tmp_path / "beta.json"
  partial = tmp_path / "beta.json.partial.json"
  partial.write_text(json.dumps({"identity": {"scoring": "magnitude"}, "trajectory": []}))
  proc = run_script("calibrate.py", f"--model={tiny_llama_with_tokenizer}", f"--out={out}",
                    f"--data={data_dir / 'wikitext2_raw' / 'wiki.test.raw'}",
                    "--target_ffn_fraction=0.8")
  assert proc.returncode == 2
  assert proc.stderr.startswith(f"error: {partial} holds the measurements of an interrupted run "
                                "with other settings (")
  assert "scoring" in proc.stderr and not out.exists()
