"""Memory-limit mode: sparsified layers' FFNs in host memory (CPU has the
`pinned_host` memory kind): decoding equals the device-resident run token for
token, the decode step reads only device memory, the full FFNs stay on the
host, and each function compiles once."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.core import cost
from coreinfer_jax.core.gather import CoreGather
from coreinfer_jax.core.policy import Stability
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.runtime import offload
from coreinfer_jax.runtime.generator import Generator
from tests.conftest import REPO, make_tiny_hf_model, random_prompts, run_generate, run_script


@pytest.fixture(scope="module", params=["llama_tied", "opt_pre_ln"])
def tiny(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp(request.param))
  make_tiny_hf_model(request.param).save_pretrained(folder)
  return loading.load_model(folder, with_tokenizer=False)


def _policy(m, **kw):
  return Stability(core_spec(m.config.num_layers, m.config.intermediate_size, beta=0.5,
                             sparse_layers="1:3", **kw))


@pytest.mark.parametrize("sharing,gather_on", [("per_sequence", "device"), ("shared", "device"),
                                               ("per_sequence", "host"), ("shared", "host")])
def test_offloaded_decoding_equals_device_resident_decoding(tiny, sharing, gather_on):
  policy = _policy(tiny, sharing=sharing)
  resident = Generator(tiny.config, tiny.params, cache_len=64, policy=policy)
  offloaded = Generator(tiny.config, tiny.params, cache_len=64, policy=policy, offload_ffn=True,
                        offload_gather=gather_on)
  prompts = random_prompts([5, 17, 11], seed=21)
  want, _ = resident.generate_ids(prompts, 10)
  got, _ = offloaded.generate_ids(prompts, 10)
  assert [r.token_ids for r in got] == [r.token_ids for r in want]
  for ids in prompts:   # and one at a time, other core sets: no recompilation
    assert offloaded.generate_ids([ids], 6)[0][0].token_ids == resident.generate_ids([ids], 6)[0][0].token_ids
  assert offloaded.compiled.compiles["decode"] == 2 and offloaded.compiled.compiles["prefill"] == 2  # B 3, B 1


@pytest.mark.parametrize("gather_on", offload.GATHER_SIDES)
def test_decode_reads_device_memory_only_and_full_ffns_stay_on_the_host(tiny, gather_on):
  gen = Generator(tiny.config, tiny.params, cache_len=64, policy=_policy(tiny), offload_ffn=True,
                  offload_gather=gather_on)
  kinds = lambda tree: {a.sharding.memory_kind for a in jax.tree_util.tree_leaves(tree)}   # noqa: E731
  for i, layer in enumerate(gen.params.layers):
    assert kinds(layer.ffn) == ({offload.HOST} if i in (1, 2) else {"device"})
    assert kinds(layer.attn) == {"device"}
  state = gen.prefill(gen.params, random_prompts([9], seed=2), 4)
  assert kinds(state.decode_params) == {"device"}
  assert kinds(state.cache) == {"device"}
  for i in (1, 2):   # the compact FFN holds k/F of the sparsified FFN's bytes
    k, F = gen.policy.spec.layer_k[i], tiny.config.intermediate_size
    compact = state.decode_params.layers[i].ffn
    dense_bytes = cost.param_bytes(tiny.params.layers[i].ffn.replace(down_bias_D=None))
    assert cost.param_bytes(compact.replace(down_bias_D=None)) == dense_bytes * k // F
  tokens, cache = gen.decode(state.decode_params, state.cache, state.tokens_B)
  assert kinds(cache) == {"device"} and np.asarray(tokens).shape == (1,)
  # the host-side gather is compiled to run on the host; the device-side one is not
  gather = offload.HostFFNGather(CoreGather(), gather_on)
  gather_hlo = jax.jit(gather).lower(gen.params, state.core).compile().as_text()
  assert ('_xla_compute_type="host"' in gather_hlo) == (gather_on == "host")


def test_offload_without_a_sparse_method_or_a_host_gather_on_a_mesh_is_refused():
  with pytest.raises(ValueError, match="--offload_ffn needs a sparse method"):
    offload.check_offload(True, sparse=False, tp=1)
  with pytest.raises(ValueError, match=r"--offload_gather=host runs on one device"):
    offload.check_offload(True, sparse=True, tp=2, gather_on="host")
  with pytest.raises(ValueError, match=r"--offload_gather must be one of device, host, got 'gpu'"):
    offload.check_offload(True, sparse=True, tp=1, gather_on="gpu")
  offload.check_offload(True, sparse=True, tp=2, gather_on="device")


def test_generate_offloads_and_refuses_dense_offload_before_loading(tiny_llama_with_tokenizer, tmp_path):
  out = tmp_path / "out.json"
  args = [f"--model={tiny_llama_with_tokenizer}", "--prompt=hello there", "--max_new_tokens=6",
          "--cache_len=64", "--nostream", "--method=stability", "--beta=0.5", "--sparse_layers=all"]
  resident = run_generate(*args, f"--json_out={out}")
  assert resident.returncode == 0, resident.stderr
  want = json.loads(out.read_text())["token_ids"]
  offloaded = run_generate(*args, "--offload_ffn", f"--json_out={out}")
  assert offloaded.returncode == 0, offloaded.stderr
  assert json.loads(out.read_text())["token_ids"] == want
  dense = run_generate(f"--model={tiny_llama_with_tokenizer}", "--prompt=hi", "--offload_ffn")
  assert dense.returncode == 2
  assert dense.stderr.strip() == ("error: --offload_ffn needs a sparse method: dense decoding reads "
                                  "every FFN weight at each step")


def test_memory_record_counts_each_memory_from_the_arrays(tiny):
  policy = _policy(tiny)
  ffn_bytes = [cost.param_bytes(layer.ffn) for layer in tiny.params.layers]
  total = cost.param_bytes(tiny.params)
  for offloaded, gather_on in ((False, "device"), (True, "device"), (True, "host")):
    gen = Generator(tiny.config, tiny.params, cache_len=64, policy=policy, offload_ffn=offloaded,
                    offload_gather=gather_on)
    _, stats = gen.generate_ids(random_prompts([7], seed=4), 3)
    compact = sum(cost.param_bytes(gen.prefill(gen.params, random_prompts([7], seed=4), 3)
                                   .decode_params.layers[i].ffn) for i in (1, 2))
    host = ffn_bytes[1] + ffn_bytes[2] if offloaded else 0
    assert stats.memory["host_weight_bytes"] == host
    assert stats.memory["device_weight_bytes_decode"] == total - ffn_bytes[1] - ffn_bytes[2] + compact
    # resident weights + compact FFNs, + one layer's FFN copied in when offloaded
    assert stats.memory["device_weight_bytes_peak"] == (total - host + compact
                                                        + (max(ffn_bytes[1:3]) if offloaded else 0))
    # the prefill streams the host FFNs in; the gather copies them again, or only the core rows
    crossing = 0 if not offloaded else host + (host if gather_on == "device" else compact)
    assert stats.memory["host_to_device_bytes_per_prompt"] == crossing


@pytest.mark.parametrize("offloaded", [False, True])
def test_the_plan_before_loading_is_what_the_run_reports(tiny, offloaded):
  policy = _policy(tiny)
  plan = offload.planned_memory(tiny.config, policy.spec, np.float32, offloaded, 2, 64)
  gen = Generator(tiny.config, tiny.params, cache_len=64, policy=policy, offload_ffn=offloaded)
  _, stats = gen.generate_ids(random_prompts([7, 9], seed=4), 3)
  assert plan["weights"] == stats.memory["device_weight_bytes_peak"]
  cfg = tiny.config
  assert plan["cache"] == 2 * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 64 * 4


def test_a_device_memory_limit_too_small_is_refused_before_loading(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "benchmark.py"), "--shape=llama3-8b",
       "--methods=dense,stability", "--betas=0.4", "--offload_ffn", "--device_memory_limit_gb=8",
       "--dtype=bfloat16", "--cache_len=1024"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error: --device_memory_limit_gb=8: the run needs 16.")
  assert "GB of weights at peak" in proc.stderr and "KV cache" in proc.stderr


def test_benchmark_times_transformers_offloaded_to_the_same_budget(tiny_llama_with_tokenizer, tmp_path):
  # The tiny model's weights take 403 kB, offloaded 391 kB at peak with its cache: a 400 kB
  # budget fits ours and leaves some of transformers' modules off the device (here: on disk).
  out = tmp_path / "bench.json"
  args = [f"--model={tiny_llama_with_tokenizer}", "--methods=stability", "--betas=0.5", "--sparse_layers=all",
          "--prompt_len=8", "--cache_len=32", "--decode_steps=2", "--rounds=1", "--offload_ffn"]
  proc = run_script("benchmark.py", *args, "--device_memory_limit_gb=0.0004", "--compare_hf_offload",
                    "--top_ms=bisection,top_k", "--offload_modes=device,host", f"--json_out={out}")
  assert proc.returncode == 0, proc.stderr
  payload = json.loads(out.read_text())
  tiers = payload["hf_offload_modules"]
  assert set(tiers) == {"cpu", "disk"} and all(n > 0 for n in tiers.values())
  assert payload["hf_device"] == "cpu" and payload["hf_decode_tokens_per_second"] is None
  assert [(r["core"]["top_m"], r["offload"]) for r in payload["runs"]] == [
      ("bisection", "device"), ("bisection", "host"), ("top_k", "device"), ("top_k", "host")]
  moved = {r["offload"]: r["memory"]["host_to_device_bytes_per_prompt"] for r in payload["runs"]}
  assert moved["host"] < moved["device"]   # the host-side gather copies only the core rows
  for run in payload["runs"]:
    measured = payload["hf_offload_decode_tokens_per_second"]
    assert (run["speedup_vs_hf_offload"] is None) == (measured is None)
    assert run["memory"]["device_weight_bytes_peak"] <= 0.0004e9
  refused = run_script("benchmark.py", *args, "--compare_hf_offload")
  assert refused.returncode == 2
  assert refused.stderr.strip() == ("error: --compare_hf_offload needs --device_memory_limit_gb: "
                                    "the device budget transformers is offloaded to")
