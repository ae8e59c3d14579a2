"""Several hosts: two processes on localhost (CPU, gloo collectives) form one
two-device mesh and generate exactly what one process generates."""

import json
import os
import socket
import subprocess
import sys

import pytest

from coreinfer_jax.runtime import distributed
from tests.conftest import REPO, run_generate


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _generate(model, out, *args, env=None):
  return subprocess.Popen(
      [sys.executable, os.path.join(REPO, "scripts", "generate.py"), f"--model={model}",
       "--prompt=the tiny model says", "--max_new_tokens=8", "--cache_len=64", "--nostream",
       "--method=stability", "--beta=0.5", "--sparse_layers=all", f"--json_out={out}", *args],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("placement", ["local", "global"])
def test_two_processes_generate_what_one_process_does(tiny_llama_with_tokenizer, tmp_path, placement):
  one = _generate(tiny_llama_with_tokenizer, tmp_path / "one.json")
  address = f"localhost:{_free_port()}"
  procs = [_generate(tiny_llama_with_tokenizer, tmp_path / f"p{i}.json", "--tp=2",
                     f"--core_placement={placement}", f"--coordinator_address={address}",
                     "--num_processes=2", f"--process_id={i}") for i in range(2)]
  for proc in [one] + procs:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
  want = json.loads((tmp_path / "one.json").read_text())
  got = json.loads((tmp_path / "p0.json").read_text())
  assert not (tmp_path / "p1.json").exists()   # only process 0 writes
  assert got["tp"] == 2 and got["core_placement"] == placement
  if placement == "global":   # the same core sets as one device: the same tokens
    assert got["token_ids"] == want["token_ids"]
  else:   # local sets differ from one device's; check against a one-process 2-block run
    blocked = _generate(tiny_llama_with_tokenizer, tmp_path / "blocked.json", "--tp=2",
                        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    _, err = blocked.communicate(timeout=300)
    assert blocked.returncode == 0, err[-3000:]
    assert got["token_ids"] == json.loads((tmp_path / "blocked.json").read_text())["token_ids"]


@pytest.mark.parametrize("args, message", [
    (["--num_processes=0"], "--num_processes must be at least 1, got 0"),
    (["--num_processes=2", "--process_id=2"], "--process_id=2 is not in 0..1"),
    (["--coordinator_address=localhost", "--num_processes=2", "--process_id=0"],
     "--coordinator_address='localhost': expected HOST:PORT"),
])
def test_bad_process_settings_are_one_line_before_loading(tiny_llama, args, message):
  proc = run_generate(f"--model={tiny_llama}", "--prompt=hello", *args)
  assert proc.returncode == 2
  assert proc.stderr.strip() == f"error: {message}"


def test_one_process_without_settings_does_not_start_distributed(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  assert not distributed.wanted(None, None, None)
  assert distributed.wanted(None, 2, None)
