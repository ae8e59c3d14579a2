"""Tensor parallelism: bad input refused in one line here; the multi-device
checks run in a process that sees four CPU devices."""

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


def test_sparse_decoding_on_a_mesh_is_refused_until_it_is_built(tiny_llama):
  proc = run_generate(f"--model={tiny_llama}", "--prompt=hello", "--tp=2", "--method=stability")
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error: sparse decoding on a device mesh is not built yet")
