"""Similarity-guided core neurons: clustering, artefacts, run-time decoding, errors."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coreinfer_jax.core import artefacts
from coreinfer_jax.offline import clustering
from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.model import forward as model
from coreinfer_jax.core import clusters as similarity
from coreinfer_jax.eval import datasets as texts
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.core.policy import Similarity, Stability
from tests.conftest import REPO, make_tiny_hf_model, random_prompts, run_generate, run_script


def _load(folder):
  return loading.load_model(folder, with_tokenizer=False)


@pytest.fixture(scope="module")
def tiny(tiny_llama):
  return _load(tiny_llama)


def _plan(m, beta=0.4, cluster_layer=1):
  spec = core_spec(m.config.num_layers, m.config.intermediate_size, beta=beta, sparse_layers="all")
  return spec, clustering.StatisticsPlan.for_spec(spec, cluster_layer, spec.layer_k[cluster_layer])


def _stats(m, plan, ids, **kw):
  return clustering.collect_statistics(m.params, m.config, ids, plan, batch_size=3, **kw)


def test_a_texts_own_statistics_give_its_stability_core_set(tiny):
  """The per-text keys, ranked, are exactly what the stability prefill selects."""
  spec, plan = _plan(tiny)
  prompts = random_prompts([5, 12, 9, 3], seed=3)
  stats = _stats(tiny, plan, prompts)
  gen = Generator(tiny.config, tiny.params, cache_len=64, policy=Stability(spec))
  for n, ids in enumerate(prompts):
    core = gen.prefill(tiny.params, [ids], 4).core
    for layer in spec.sparse_layers:
      np.testing.assert_array_equal(stats.layer_sets(layer, spec.layer_k[layer])[n], core[layer][0])
    np.testing.assert_array_equal(stats.cluster_sets_NK[n], core[plan.cluster_layer][0])


def test_cluster_core_sets_rank_the_summed_statistics(tiny):
  """A cluster's set: neurons by summed token-wise counts, then summed scores,
  then index (a NumPy reference); a one-text cluster keeps that text's set."""
  spec, plan = _plan(tiny)
  stats = _stats(tiny, plan, random_prompts([6, 11, 4, 8, 13], seed=5))
  labels = np.array([0, 1, 0, 2, 1])
  sets = clustering.cluster_core_sets(labels, 3, stats, spec.layer_k)
  for layer in spec.sparse_layers:
    k = spec.layer_k[layer]
    for c in range(3):
      counts = stats.primary[layer][labels == c].sum(0)
      summed = stats.secondary[layer][labels == c].astype(np.float64).sum(0).astype(np.float32)
      order = np.lexsort((np.arange(len(counts)), -summed, -counts))
      np.testing.assert_array_equal(sets[layer][c], order[:k])
    np.testing.assert_array_equal(sets[layer][2], stats.layer_sets(layer, k)[3])


def test_nearest_cluster_is_kmeans_predict(tiny):
  _, plan = _plan(tiny)
  stats = _stats(tiny, plan, random_prompts(range(3, 23), seed=11))
  points = clustering.multi_hot(stats.cluster_sets_NK, tiny.config.intermediate_size)
  fit = clustering.kmeans(points, 4, seed=0)
  got = similarity.nearest_cluster(jnp.asarray(fit.cluster_centers_), jnp.asarray(stats.cluster_sets_NK))
  np.testing.assert_array_equal(np.asarray(got), fit.predict(points))


def test_clustering_is_deterministic_for_a_seed(tiny):
  _, plan = _plan(tiny)
  ids = random_prompts(range(3, 30), seed=2)
  runs = []
  for _ in range(2):
    points = clustering.multi_hot(_stats(tiny, plan, ids).cluster_sets_NK, tiny.config.intermediate_size)
    num, inertia = clustering.choose_num_clusters(points, seed=0)
    fit = clustering.kmeans(points, num, seed=0)
    runs.append((num, inertia, fit.cluster_centers_, fit.labels_))
  assert runs[0][0] >= clustering.MIN_CLUSTERS and len(runs[0][1]) == clustering.MAX_CLUSTERS
  assert all(a <= b + 1e-6 for a, b in zip(runs[0][1][1:], runs[0][1]))   # inertia decreases
  chex.assert_trees_all_equal(runs[0], runs[1])


def test_interrupted_statistics_resume_without_recomputing(tiny, tmp_path):
  _, plan = _plan(tiny)
  ids = random_prompts(range(3, 17), seed=4)          # 14 texts: 5 batches of 3
  expected = _stats(tiny, plan, ids)
  fn = jax.jit(clustering.statistics_fn(tiny.config, plan))   # as compiled in the library
  calls = []

  def interrupted(tokens, start):
    if len(calls) == 2:
      raise KeyboardInterrupt
    calls.append(tokens.shape)
    return fn(tiny.params, tokens, start)

  work = str(tmp_path / "work")
  with pytest.raises(KeyboardInterrupt):
    _stats(tiny, plan, ids, work_dir=work, compute_batch=interrupted)
  assert sorted(os.listdir(work)) == ["batch-000000.npz", "batch-000001.npz"]
  calls.clear()
  counted = lambda tokens, start: calls.append(1) or fn(tiny.params, tokens, start)  # noqa: E731
  resumed = _stats(tiny, plan, ids, work_dir=work, compute_batch=counted)
  assert (len(calls), resumed.batches_computed, resumed.batches_resumed) == (3, 3, 2)
  chex.assert_trees_all_equal((resumed.cluster_sets_NK, resumed.primary, resumed.secondary),
                              (expected.cluster_sets_NK, expected.primary, expected.secondary))


def _artefacts(m, spec, layer_sets, centroids, cluster_layer, cluster_k, **manifest):
  record = {"model": {"path": "x", "fingerprint": "fp", "config": {
      "num_layers": m.config.num_layers, "intermediate_size": m.config.intermediate_size}},
      "core": artefacts.spec_record(spec), "cluster_layer": cluster_layer, "cluster_k": cluster_k}
  return artefacts.ClusterArtefacts(np.asarray(centroids, np.float32), tuple(layer_sets),
                                    np.zeros((3,), np.int32), dict(record, **manifest))


def test_artefacts_round_trip_and_an_interrupted_save_keeps_the_previous(tiny, tmp_path, monkeypatch):
  spec, _ = _plan(tiny)
  rng = np.random.default_rng(0)
  sets = [rng.integers(0, 96, (4, k)).astype(np.int32) for k in spec.layer_k]
  first = _artefacts(tiny, spec, sets, rng.random((4, 96)), 1, spec.layer_k[1])
  out = str(tmp_path / "clusters")
  artefacts.save(out, first)
  loaded = artefacts.load(out)
  chex.assert_trees_all_equal((loaded.centroids_CF, loaded.layer_sets, loaded.assignments_N),
                              (first.centroids_CF, first.layer_sets, first.assignments_N))
  assert loaded.spec == spec and loaded.manifest["format"] == artefacts.FORMAT

  second = _artefacts(tiny, spec, [s[:2] for s in sets], rng.random((2, 96)), 1, spec.layer_k[1])
  monkeypatch.setattr(artefacts.files, "write_json", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
  with pytest.raises(KeyboardInterrupt):
    artefacts.save(out, second)
  monkeypatch.undo()
  chex.assert_trees_all_equal(artefacts.load(out).centroids_CF, first.centroids_CF)
  artefacts.save(out, second)
  assert artefacts.load(out).num_clusters == 2
  # Both the replaced arrays and the interrupted save's orphan are gone.
  assert sorted(os.listdir(out)) == sorted(["manifest.json", artefacts.read_manifest(out)["artefacts"]])


def test_single_cluster_holding_the_prompts_sets_equals_stability_decoding(tiny):
  spec, _ = _plan(tiny)
  prompt = random_prompts([14], seed=9)[0]
  stability = Generator(tiny.config, tiny.params, cache_len=64, policy=Stability(spec))
  core = stability.prefill(tiny.params, [prompt], 12).core
  cluster_layer = 2
  art = _artefacts(tiny, spec, [np.asarray(c) for c in core], np.ones((1, 96)) * 0.5,
                   cluster_layer, spec.layer_k[cluster_layer])
  similar = Generator(tiny.config, tiny.params, cache_len=64, policy=Similarity(art))
  expected, _ = stability.generate_ids([prompt], 12)
  got, stats = similar.generate_ids([prompt], 12)
  assert got[0].token_ids == expected[0].token_ids and stats.cluster_ids == [0]
  a = stability.prefill(tiny.params, [prompt], 4)
  b = similar.prefill(tiny.params, [prompt], 4)
  step = a.tokens_B[:, None]
  chex.assert_trees_all_equal(model.forward(b.decode_params, tiny.config, b.cache, step)[0],
                              model.forward(a.decode_params, tiny.config, a.cache, step)[0])
  # The prefill ranks the clustering layer only; decoding uses the cluster's sets.
  assert [r is not None for r in similar.policy.requests(3)] == [i == cluster_layer for i in range(3)]
  for c, s in zip(b.core, art.layer_sets):
    np.testing.assert_array_equal(np.asarray(c), s[:1])


def _three_prompt_clusters(tiny):
  """(spec, prompts, artefacts): three clusters, each centred on one prompt's
  clustering-layer set (in reverse order), holding that prompt's sets."""
  spec, plan = _plan(tiny)
  prompts = random_prompts([5, 17, 9], seed=12)
  stats = _stats(tiny, plan, prompts)
  centroids = clustering.multi_hot(stats.cluster_sets_NK[::-1], 96)
  sets = [np.stack([stats.layer_sets(i, k)[n] for n in (2, 1, 0)]) for i, k in enumerate(spec.layer_k)]
  return spec, prompts, _artefacts(tiny, spec, sets, centroids, plan.cluster_layer, plan.cluster_k)


def test_similarity_batches_pick_each_prompts_cluster(tiny):
  spec, prompts, art = _three_prompt_clusters(tiny)
  gen = Generator(tiny.config, tiny.params, cache_len=64, policy=Similarity(art))
  batch = gen.prefill(tiny.params, prompts, 4)
  np.testing.assert_array_equal(batch.cluster_ids, [2, 1, 0])
  for n, ids in enumerate(prompts):
    alone, _ = gen.generate_ids([ids], 6)
    stability, _ = Generator(tiny.config, tiny.params, cache_len=64,
                             policy=Stability(spec)).generate_ids([ids], 6)
    assert alone[0].token_ids == stability[0].token_ids
  assert gen.store.gathered == (0, 1, 2)
  assert gen.compiled.compiles["gather_cluster"] == 1


def test_cluster_script_then_similarity_generation(tiny_llama_with_tokenizer, synthetic_texts,
                                                   tmp_path):
  out = str(tmp_path / "clusters")
  model_dir = str(tiny_llama_with_tokenizer)
  result = run_script("cluster.py", f"--model={model_dir}", f"--dataset={synthetic_texts}", f"--out_dir={out}",
                        "--holdout_fraction=0.2", "--noprogress")
  assert result.returncode == 0, result.stderr
  manifest = json.load(open(os.path.join(out, "manifest.json")))
  assert manifest["num_clusters_from"] == "elbow" and manifest["num_clusters"] >= 4
  assert manifest["dataset"]["num_texts"] == 24 and manifest["dataset"]["total_texts"] == 30
  assert manifest["model"]["fingerprint"] == loading.fingerprint(model_dir)
  assert manifest["cluster_layer"] == clustering.default_cluster_layer(3) == 2
  assert sum(manifest["cluster_sizes"]) == 24 and not any(n.startswith(".partial") for n in os.listdir(out))
  art = artefacts.load(out)
  assert all(s.shape == (manifest["num_clusters"], 38) for s in art.layer_sets)

  json_out = str(tmp_path / "g.json")
  result = run_generate(f"--model={model_dir}", "--prompt=a b the c", "--max_new_tokens=5",
                        "--method=similarity", f"--cluster_dir={out}", f"--json_out={json_out}",
                        "--nostream")
  assert result.returncode == 0, result.stderr
  record = json.load(open(json_out))
  assert record["method"] == "similarity" and 0 <= record["cluster_id"] < manifest["num_clusters"]
  assert record["ffn_bytes_fraction"] == pytest.approx(38 / 96)


def _cluster_dir(tiny_llama_with_tokenizer, synthetic_texts, tmp_path, *args):
  out = str(tmp_path / "clusters")
  result = run_script("cluster.py", f"--model={tiny_llama_with_tokenizer}", f"--dataset={synthetic_texts}",
                        f"--out_dir={out}", "--num_clusters=2", "--noprogress", *args)
  assert result.returncode == 0, result.stderr
  return out


def _edit_manifest(out, **changes):
  path = os.path.join(out, "manifest.json")
  manifest = json.load(open(path))
  manifest["model"]["config"].update(changes)
  json.dump(manifest, open(path, "w"))


def test_mismatched_artefacts_are_refused(tiny_llama_with_tokenizer, synthetic_texts, tmp_path):
  out = _cluster_dir(tiny_llama_with_tokenizer, synthetic_texts, tmp_path)
  other = tmp_path / "other_model"
  make_tiny_hf_model("llama_tied", seed=1).save_pretrained(str(other))
  base = ["--prompt=a b", "--max_new_tokens=2", "--method=similarity", f"--cluster_dir={out}"]
  cases = [
      ([f"--model={other}"], "model fingerprint (another checkpoint)"),
      ([f"--model={tiny_llama_with_tokenizer}", "--beta=0.3"],
       "β (kept fraction): built with 0.4, asked for 0.3"),
      ([f"--model={tiny_llama_with_tokenizer}", "--sparse_layers=0,1"],
       "sparsified layers: built with [0, 1, 2], asked for [0, 1]"),
      ([f"--model={tiny_llama_with_tokenizer}", "--scoring=magnitude"],
       "scoring: built with signed, asked for magnitude"),
  ]
  for args, message in cases:
    result = run_generate(*base, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
  for field, value, message in (("num_layers", 4, "number of layers: built with 4, asked for 3"),
                                ("intermediate_size", 128, "FFN width (intermediate_size): built "
                                                           "with 128, asked for 96")):
    _edit_manifest(out, **{field: value})
    result = run_generate(*base, f"--model={tiny_llama_with_tokenizer}")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    _edit_manifest(out, num_layers=3, intermediate_size=96)


def test_texts_from_files_and_their_errors(tmp_path):
  jsonl = tmp_path / "t.jsonl"
  jsonl.write_text('{"body": "one", "topic": "x"}\n{"body": "two", "topic": "y"}\n')
  data = texts.load_texts(str(jsonl), text_key="body", label_key="topic")
  assert data.texts == ("one", "two") and data.labels == ("x", "y") and data.name == "t"
  csv_file = tmp_path / "t.csv"
  csv_file.write_text("text,other\nfirst,1\nsecond,2\n")
  assert texts.load_texts(str(csv_file), limit=1).texts == ("first",)
  with pytest.raises(ValueError, match="no field 'text'"):
    texts.load_texts(str(jsonl))
  with pytest.raises(FileNotFoundError, match="neither one of truthfulqa"):
    texts.load_texts(str(tmp_path / "missing.txt"))
  with pytest.raises(FileNotFoundError, match="TruthfulQA not found"):
    texts.load_texts("truthfulqa", str(tmp_path))
  kept, held = texts.split_indices(10, 0.3, seed=0)
  assert len(held) == 3 and sorted(np.concatenate([kept, held]).tolist()) == list(range(10))


def test_truthfulqa_has_questions_answers_and_categories():
  data_dir = os.path.join(os.path.dirname(REPO), "shared", "data")
  if not os.path.isdir(data_dir):
    pytest.skip("../shared/data is not beside the checkout")
  data = texts.load_texts("truthfulqa", data_dir)
  assert len(data) == 817 and len(set(data.labels)) == 38
  assert data.texts[0].startswith(data.prompts[0]) and data.prompts[0].endswith("?")


def test_cluster_script_refuses_bad_settings(tiny_llama_with_tokenizer, synthetic_texts, tmp_path):
  base = [f"--model={tiny_llama_with_tokenizer}", f"--dataset={synthetic_texts}",
          f"--out_dir={tmp_path / 'c'}"]
  for args, message in ((["--cluster_layer=3"], "--cluster_layer 3 is out of range"),
                        (["--num_clusters=many"], "expected 'auto' or a number"),
                        (["--num_clusters=31"], "exceeds the 30 texts"),
                        (["--sparse_layers=0", "--cluster_layer=2"], "give --cluster_beta")):
    result = run_script("cluster.py", *base, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_similarity_with_host_offloaded_ffns_equals_resident(tiny):
  _, prompts, art = _three_prompt_clusters(tiny)
  resident = Generator(tiny.config, tiny.params, cache_len=64, policy=Similarity(art))
  offloaded = Generator(tiny.config, tiny.params, cache_len=64, policy=Similarity(art),
                        offload_ffn=True, preload=True)   # every cluster gathered from host memory
  want, _ = resident.generate_ids(prompts, 8)
  got, _ = offloaded.generate_ids(prompts, 8)
  assert [r.token_ids for r in got] == [r.token_ids for r in want]
  for ffns in (offloaded.store.ffns(offloaded.params, c) for c in offloaded.store.gathered):
    assert {a.sharding.memory_kind for a in jax.tree_util.tree_leaves(ffns)} == {"device"}
