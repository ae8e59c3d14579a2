"""The GPU kit stays runnable: scripts/device_check.sh as a dry run on CPU
(two layers of SmolLM2's shape) writes one JSON holding every run, with the
memory-limit run's sparsified FFNs in host memory."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_device_check_dry_run_on_cpu_writes_every_run(tmp_path):
  env = dict(os.environ, DEVICE_CHECK_CPU="1", OUT=str(tmp_path), SHAPE="smollm2-135m",
             NUM_LAYERS="2", DTYPE="float32", BUDGET_GB="0.2", ROUNDS="1", STEPS="2",
             PROMPT_LEN="16", CACHE_LEN="64", PYTHON=sys.executable, JAX_PLATFORMS="cpu")
  proc = subprocess.run([os.path.join(REPO, "scripts", "device_check.sh")], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  runs = json.loads((tmp_path / "device_check.json").read_text())
  assert set(runs) == {"paper_layers", "all_layers", "offload", "lossless"}
  assert [r["verify"] for r in runs["lossless"]["runs"]] == [0, 0, 2, 4]
  assert "a verify costs" in proc.stdout
  assert [(r["beta"], r["core"] and r["core"]["top_m"]) for r in runs["all_layers"]["runs"]] == [
      (None, None), (0.4, "bisection"), (0.4, "top_k"), (0.2, "bisection"), (0.2, "top_k")]
  assert [(r["beta"], r["offload"]) for r in runs["offload"]["runs"]] == [
      (0.4, "device"), (0.4, "host"), (0.2, "device"), (0.2, "host")]
  for r in runs["offload"]["runs"]:
    assert r["memory"]["host_weight_bytes"] > 0
    assert r["memory"]["device_weight_bytes_peak"] < 0.2e9
  assert runs["offload"]["hf_offload_modules"]   # transformers offloaded to the same budget
  assert runs["offload"]["runs"][0]["prefill_memory"]["argument"] > 0
  for name in ("paper_layers", "all_layers"):
    assert all(r["memory"]["host_weight_bytes"] == 0 for r in runs[name]["runs"])


def test_device_check_refuses_without_a_gpu(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
  env.pop("DEVICE_CHECK_CPU", None)
  proc = subprocess.run([os.path.join(REPO, "scripts", "device_check.sh")], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "error: no GPU visible to JAX (backend cpu)" in proc.stderr
