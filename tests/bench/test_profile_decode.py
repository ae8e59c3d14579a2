"""The decode profile accounts for the step's own bytes, per kind, on the
parameters decoding really uses (dense or compact FFNs)."""

import json

import pytest

from tests.conftest import run_script

WEIGHT_KINDS = ("attention projections", "FFN in", "FFN out", "output matrix")


@pytest.mark.parametrize("method", [["--method=dense"],
                                    ["--method=stability", "--beta=0.5", "--sparse_layers=all"]])
def test_profile_reports_every_kind_with_the_steps_bytes(method, tiny_llama, tmp_path):
  out = tmp_path / "profile.json"
  proc = run_script("profile_decode.py", f"--model={tiny_llama}", "--cache_len=64",
                    "--prompt_len=8", "--repeats=2", "--pipelined_steps=4", f"--json_out={out}",
                    *method)
  assert proc.returncode == 0, proc.stderr
  record = json.loads(out.read_text())
  kinds = {k["kind"]: k for k in record["kinds"]}
  assert set(kinds) == set(WEIGHT_KINDS) | {"attention over the cache", "sampling", "dispatch"}
  # The weight kinds read what a decode token reads, bar norms and one embedding row.
  weight_kind_bytes = sum(kinds[name]["bytes"] for name in WEIGHT_KINDS)
  assert 0.98 * record["weight_bytes_per_token"] <= weight_kind_bytes <= record["weight_bytes_per_token"]
  # The cache: K and V of every layer, [1, KVH=2, 64, hd=16] float32.
  assert kinds["attention over the cache"]["bytes"] == 3 * 2 * 2 * 64 * 16 * 4
  ffn_bytes = kinds["FFN in"]["bytes"] + kinds["FFN out"]["bytes"]
  assert ffn_bytes == 3 * 3 * (96 if record["method"] == "dense" else 48) * 64 * 4
  for k in record["kinds"]:
    spread = k["seconds_spread"]
    assert 0 < spread["min"] <= spread["median"] <= spread["max"]
  assert record["limit"] in record["limits_gb_per_s"]
  assert "FFN out" in proc.stdout and "machine limit" in proc.stdout
  # Inside the traced step, every weight matrix and the cache are attributed
  # to their scope, and the rest is small.
  in_step = {row["scope"]: row for row in record["in_step"]}
  for scope in ("attention_projections", "ffn_in", "ffn_out", "output_matrix",
                "attention_over_cache", "sampling"):
    assert in_step[scope]["seconds_per_step"] > 0, scope
  assert in_step["ffn_out"]["bytes"] == kinds["FFN out"]["bytes"]
  assert sum(row["share"] for row in record["in_step"]) == pytest.approx(1)
  assert in_step.get("other", {"share": 0})["share"] < 0.5


def test_profile_refuses_a_run_that_does_not_fit_the_cache(tiny_llama):
  proc = run_script("profile_decode.py", f"--model={tiny_llama}", "--cache_len=64",
                    "--prompt_len=8", "--repeats=7", "--pipelined_steps=32")
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("error: --prompt_len + (--repeats + 2) * (--pipelined_steps + 1) = "
                                 "305 slots do not fit --cache_len 64")
