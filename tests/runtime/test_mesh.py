"""Tensor parallelism: bad input refused in one line here; the multi-device
checks run in a process that sees four CPU devices."""

import json
import os
import subprocess
import sys

import pytest

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.runtime import mesh as meshes
from tests.conftest import REPO, run_generate


def test_multi_device_checks_pass_on_four_cpu_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       os.path.join(REPO, "tests", "runtime", "multi_device_checks.py")],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert " passed" in proc.stdout and "skipped" not in proc.stdout


def test_a_tp_the_model_cannot_take_is_refused(tiny_llama):
  config = loading.load_config(tiny_llama)   # 4 heads, F 96
  with pytest.raises(ValueError, match="--tp=3 does not divide the model's 4 attention heads"):
    meshes.check_tensor_parallel(config, 3)
  with pytest.raises(ValueError, match="--tp must be at least 1"):
    meshes.check_tensor_parallel(config, 0)
  with pytest.raises(ValueError, match="--tp=8 asks for more devices than the 1 JAX sees"):
    meshes.make_mesh(8)


def test_generate_refuses_a_tp_beyond_the_devices_before_loading(tiny_llama):
  proc = run_generate(f"--model={tiny_llama}", "--prompt=hello", "--tp=2")
  assert proc.returncode == 2
  assert proc.stderr.strip() == "error: --tp=2 asks for more devices than the 1 JAX sees"


def test_generate_refuses_a_tp_that_does_not_divide_the_model(tiny_llama):
  proc = run_generate(f"--model={tiny_llama}", "--prompt=hello", "--tp=3", "--method=stability")
  assert proc.returncode == 2
  assert proc.stderr.strip() == "error: --tp=3 does not divide the model's 4 attention heads"


def test_generate_decodes_sparse_on_two_devices_and_reports_the_placement(tiny_llama_with_tokenizer,
                                                                          tmp_path):
  out = tmp_path / "out.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  for placement, load in (("local", 1.0), ("global", None)):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "generate.py"),
         f"--model={tiny_llama_with_tokenizer}", "--prompt=hello there", "--tp=2",
         "--method=stability", "--beta=0.5", "--sparse_layers=all", f"--core_placement={placement}",
         "--max_new_tokens=4", "--cache_len=64", f"--json_out={out}", "--nostream"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(out.read_text())
    assert payload["tp"] == 2 and payload["core_placement"] == placement
    assert payload["core"]["blocks"] == (2 if placement == "local" else 1)
    assert payload["decode_compiles"] == 1
    if load is not None:
      assert payload["core_device_load"] == load
    else:
      assert 1.0 <= payload["core_device_load"] <= 2.0


def test_benchmark_on_a_mesh_reports_each_devices_bytes_and_bandwidth(tiny_llama_with_tokenizer,
                                                                       tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "benchmark.py"),
       f"--model={tiny_llama_with_tokenizer}",
       "--tp=2", "--batch_size=2", "--methods=dense,stability", "--betas=0.5",
       "--core_sharings=per_sequence,shared", "--sparse_layers=all", "--prompt_len=8",
       "--cache_len=64", "--decode_steps=2", "--rounds=1", f"--json_out={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  payload = json.loads(out.read_text())
  assert payload["tp"] == 2 and payload["batch_size"] == 2
  dense, own, shared = payload["runs"]
  assert [r["core"] and r["core"]["sharing"] for r in payload["runs"]] == [None, "per_sequence", "shared"]
  # 3 layers of gated FFNs, D 64, F 96, k 48, float32, neurons split over 2 devices.
  ffn_row = 3 * 3 * 64 * 4 // 2   # one neuron's rows in every layer, per device
  step = {r["core"]["sharing"] if r["core"] else "dense": r["weight_bytes_per_step_per_device"]
          for r in payload["runs"]}
  assert step["dense"] - step["shared"] == (96 - 48) * ffn_row
  assert step["per_sequence"] - step["shared"] == 48 * ffn_row   # two sets against one
  for run in payload["runs"]:
    assert run["tp"] == 2
    assert run["bound_speedup"] == pytest.approx(step["dense"] / run["weight_bytes_per_step_per_device"])
    assert run["achieved_gb_per_s"] == pytest.approx(
        run["decode_tokens_per_second"] * run["weight_bytes_per_step_per_device"] / 1e9, rel=1e-6)
    assert run["batch_tokens_per_second"] == pytest.approx(2 * run["decode_tokens_per_second"])
  assert own["core_placement"] == shared["core_placement"] == "local"
  assert own["core_device_load"] == 1.0 and dense["core_device_load"] is None
  assert "GB/s a device" in proc.stdout
