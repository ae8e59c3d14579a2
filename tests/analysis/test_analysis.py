"""The stability / similarity / held-out analyses: their numbers and scripts."""

import json

import numpy as np
import pytest

from coreinfer_jax.analysis import similarity as analysis_similarity, stability as analysis_stability
from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.model import forward as model
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.core.policy import Stability
from tests.conftest import random_prompts, run_script
from tests.conftest import WORDS


@pytest.fixture(scope="module")
def tiny(tiny_llama):
  return loading.load_model(tiny_llama, with_tokenizer=False)


def _spec(m, beta):
  return core_spec(m.config.num_layers, m.config.intermediate_size, beta=beta, sparse_layers="all")


def test_stability_overlap_is_the_first_tokens_top_m_in_the_sentence_set(tiny):
  spec = _spec(tiny, 0.3)
  prompt = random_prompts([11], seed=1)[0]
  result = analysis_stability.stability(tiny.params, tiny.config, [prompt], spec, num_steps=3)
  # Reference: the first decode token's FFN values, its top m by signed value.
  gen = Generator(tiny.config, tiny.params, cache_len=15, buckets=(11,), policy=Stability(spec))
  first, cache, core, _ = gen.prefill_padded(tiny.params, *gen.pad([prompt], 4))
  _, _, values = model.forward_tapped(tiny.params, tiny.config, cache, first[:, None],
                                      lambda layer, v, real: v.values)
  for layer, values_BTF in enumerate(values):
    v = np.asarray(values_BTF)[0, 0]
    m = int(np.floor(np.float32(spec.alpha) * np.float32((v > 0).sum())))
    top = np.argsort(-v, kind="stable")[:m]
    expected = np.isin(top, np.asarray(core[layer][0])).mean() if m else 0.0
    assert result["overlap_by_step_layer"][0][layer] == pytest.approx(expected, abs=1e-6)
  assert np.shape(result["overlap_by_step_layer"]) == (3, 3)


def test_stability_with_every_neuron_kept_overlaps_fully(tiny):
  result = analysis_stability.stability(tiny.params, tiny.config, random_prompts([5, 9], seed=2),
                              _spec(tiny, 1.0), num_steps=4)
  assert np.allclose(result["overlap_by_step_layer"], 1.0)
  assert np.allclose(result["random_by_step_layer"], 1.0)


def test_jaccard_matrix_matches_python_sets():
  sets = np.array([[0, 1, 2], [2, 3, 4], [0, 1, 2], [5, 6, 7]])
  got = analysis_similarity.jaccard_matrix(sets, 8)
  for i in range(4):
    for j in range(4):
      a, b = set(sets[i]), set(sets[j])
      assert got[i, j] == pytest.approx(len(a & b) / len(a | b))


@pytest.fixture
def labelled_texts(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "texts.jsonl"
  with open(path, "w") as fh:
    for n in range(24):
      words = " ".join(rng.choice(WORDS[:6] if n % 2 else WORDS[6:], rng.integers(3, 10)))
      fh.write(json.dumps({"text": words, "group": f"g{n % 2}"}) + "\n")
  return str(path)


@pytest.mark.parametrize("kind", ["stability", "similarity"])
def test_analyze_script_writes_json_and_png(tiny_llama_with_tokenizer, labelled_texts, tmp_path, kind):
  out = tmp_path / "out"
  result = run_script("analyze.py", f"--analysis={kind}", f"--model={tiny_llama_with_tokenizer}",
                       f"--dataset={labelled_texts}", "--label_field=group", "--limit=12",
                       "--num_steps=5", f"--out_dir={out}")
  assert result.returncode == 0, result.stderr
  record = json.load(open(out / f"{kind}.json"))
  assert (out / f"{kind}.png").stat().st_size > 10_000
  if kind == "stability":
    assert np.shape(record["overlap_by_step_layer"]) == (5, 3) and record["num_prompts"] == 12
  else:
    assert record["num_pairs"] == 66 and record["focus_layer"] == 2
    focus = record["focus"]
    assert {"jaccard_same_label", "jaccard_different_label", "same_label_auc",
            "tfidf_cosine"} <= set(focus)
    assert -1 <= focus["same_label"]["spearman"] <= 1


def test_held_out_cluster_analysis(tiny_llama_with_tokenizer, labelled_texts, tmp_path):
  clusters = tmp_path / "clusters"
  result = run_script("cluster.py", f"--model={tiny_llama_with_tokenizer}",
                       f"--dataset={labelled_texts}", f"--out_dir={clusters}",
                       "--holdout_fraction=0.25", "--num_clusters=3", "--noprogress")
  assert result.returncode == 0, result.stderr
  out = tmp_path / "out"
  result = run_script("analyze.py", "--analysis=clusters", f"--model={tiny_llama_with_tokenizer}",
                       f"--cluster_dir={clusters}", f"--out_dir={out}")
  assert result.returncode == 0, result.stderr
  record = json.load(open(out / "clusters.json"))
  assert record["num_held_out"] == 6 and record["layers"] == [0, 1, 2]
  assert sum(record["clusters_chosen_counts"]) == 6
  assert all(0 <= x <= 1 for x in record["own_cluster_by_layer"] + record["other_cluster_by_layer"])
  assert record["random_set_by_layer"] == [38 / 96] * 3
  assert (out / "clusters.png").is_file()


def test_held_out_analysis_needs_a_split(tiny_llama_with_tokenizer, labelled_texts, tmp_path):
  clusters = tmp_path / "clusters"
  assert run_script("cluster.py", f"--model={tiny_llama_with_tokenizer}",
                     f"--dataset={labelled_texts}", f"--out_dir={clusters}", "--num_clusters=2",
                     "--noprogress").returncode == 0
  result = run_script("analyze.py", "--analysis=clusters", f"--model={tiny_llama_with_tokenizer}",
                       f"--cluster_dir={clusters}", f"--out_dir={tmp_path / 'out'}")
  assert result.returncode == 2 and "without a held-out split" in result.stderr
