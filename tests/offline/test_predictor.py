"""The learned-predictor baseline (Deja Vu): training, resume, decoding and scoring."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from coreinfer_jax.checkpoint import load as loading
from coreinfer_jax.core import methods
from coreinfer_jax.core import predictor as predictors
from coreinfer_jax.core.policy import Dense, Predicted
from coreinfer_jax.core.spec import core_spec
from coreinfer_jax.eval.scorer import ContinuationScorer
from coreinfer_jax.model.ffn import FFNParams
from coreinfer_jax.model.forward import forward
from coreinfer_jax.model.token_ffn import TokenMaskedFFN
from coreinfer_jax.offline import predictor_data, predictor_training
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.runtime.prefill import prefill
from tests.conftest import make_tiny_hf_model, random_prompts, run_generate, run_script


@pytest.fixture(scope="module")
def tiny(tiny_llama):
  return loading.load_model(tiny_llama, with_tokenizer=False)


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
  """A tiny OPT (ReLU FFN: a linear predictor can rank its neurons, as Deja Vu's)."""
  folder = str(tmp_path_factory.mktemp("opt_predictor"))
  make_tiny_hf_model("opt_pre_ln", seed=3).save_pretrained(folder)
  return loading.load_model(folder, with_tokenizer=False)


def _settings(**kw):
  return predictor_training.TrainSettings(**dict(
      dict(rank=16, steps=12, batch_tokens=64, learning_rate=3e-3, warmup_steps=2,
           weight_decay=0.01, seed=0, checkpoint_every=4), **kw))


def _data(m, layers, seed=0, texts=24):
  plan = predictor_data.LabelPlan(tuple(layers), 0.5, (0.5,))
  lengths = [10 + (7 * i) % 15 for i in range(texts)]
  return predictor_data.collect(m.params, m.config, random_prompts(lengths, seed=seed), plan,
                                batch_size=8)[0]


def _artefacts(m, layers, down_LRD, up_LFR):
  manifest = {"model": {"path": "tiny", "fingerprint": None,
                        "config": {"num_layers": m.config.num_layers}},
              "layers": list(layers), "rank": down_LRD.shape[1], "label_fraction": 0.5}
  return predictors.PredictorArtefacts(predictors.predictors_from_arrays(
      layers, down_LRD, up_LFR, m.config.num_layers), manifest)


def test_labels_are_each_tokens_top_neurons_and_pack_losslessly(tiny):
  layers = (0, 2)
  data = _data(tiny, layers, texts=3)
  assert data.x_NLD.shape == (len(data.text_N), 2, tiny.config.hidden_size)
  labels = np.unpackbits(data.labels_NLP, axis=-1)[..., :tiny.config.intermediate_size]
  k = round(0.5 * tiny.config.intermediate_size)
  np.testing.assert_array_equal(labels.sum(-1), k)
  # the labels are the top k of |h| recomputed from the tapped input
  x = data.x_NLD[:, 0]
  ffn = tiny.params.layers[0].ffn
  h = jax.nn.silu(x @ np.asarray(ffn.gate_FD).T) * (x @ np.asarray(ffn.up_FD).T)
  top = np.argsort(-np.abs(h), axis=-1)[:, :k]
  np.testing.assert_array_equal(np.sort(np.nonzero(labels[:, 0])[1].reshape(-1, k), -1),
                                np.sort(top, -1))
  np.testing.assert_array_equal(
      np.asarray(predictor_data.unpack_bits(jnp.asarray(data.labels_NLP),
                                            tiny.config.intermediate_size)), labels)


def test_training_loss_falls_and_recall_beats_chance(tiny_opt):
  F = tiny_opt.config.intermediate_size
  data = _data(tiny_opt, (0, 1, 2))
  held_out = data.text_N >= 20
  result = predictor_training.train(data.x_NLD[~held_out], data.labels_NLP[~held_out], F,
                                    _settings(steps=60))
  assert np.mean(result.losses[-10:]) < 0.8 * np.mean(result.losses[:5])
  recall = predictor_training.recall(result.params, data.x_NLD[held_out],
                                     data.top_NLEP[held_out], (0.5,), F)
  assert recall["0.5"]["mean"] > 0.6   # chance is 0.5


def test_resumed_training_equals_an_uninterrupted_run(tiny, tmp_path):
  data = _data(tiny, (1,), texts=8)
  whole = predictor_training.train(data.x_NLD, data.labels_NLP, tiny.config.intermediate_size,
                                   _settings())

  def interrupt(step):
    if step == 6:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    predictor_training.train(data.x_NLD, data.labels_NLP, tiny.config.intermediate_size,
                             _settings(), work_dir=str(tmp_path / "ckpt"), on_step=interrupt)
  resumed = predictor_training.train(data.x_NLD, data.labels_NLP, tiny.config.intermediate_size,
                                     _settings(), work_dir=str(tmp_path / "ckpt"))
  assert resumed.resumed_from == 4
  for name in whole.params:
    np.testing.assert_array_equal(resumed.params[name], whole.params[name])
  assert resumed.losses == whole.losses


@struct.dataclass
class _DenseTopK:
  """The reference: each token keeps the top k of its own dense |h| (ReLU FFN)."""
  dense: FFNParams
  k: int = struct.field(pytree_node=False, default=1)

  def for_input(self, x_BTD):
    up, _ = self.dense.project_in(x_BTD)
    top = jnp.argsort(-jnp.abs(jax.nn.relu(up)), axis=-1, stable=True)[..., :self.k]
    keep = jnp.zeros(up.shape).at[jnp.arange(up.shape[0])[:, None, None],
                                  jnp.arange(up.shape[1])[None, :, None], top].set(1.0)
    return TokenMaskedFFN(self.dense, keep)


def test_an_oracle_predictor_decodes_as_the_masked_ffn_reference(tmp_path):
  model = make_tiny_hf_model("opt_pre_ln", seed=3)
  for layer in model.model.decoder.layers:   # no fc1 bias: x W1ᵀ ranks exactly as h
    layer.fc1.bias.data.zero_()
  model.save_pretrained(str(tmp_path / "opt"))
  m = loading.load_model(str(tmp_path / "opt"), with_tokenizer=False)
  layers, (F, D) = (0, 1, 2), m.params.layers[0].ffn.up_FD.shape
  oracle = _artefacts(m, layers, np.stack([np.eye(D, dtype=np.float32)] * 3),
                      np.stack([np.asarray(m.params.layers[i].ffn.up_FD) for i in layers]))
  spec = core_spec(m.config.num_layers, F, beta=0.3, sparse_layers="all")
  k = spec.layer_k[0]
  gen = Generator(m.config, m.params, cache_len=64, policy=Predicted(spec, oracle))
  prompts = random_prompts([7, 12], seed=5)
  steps = 10
  results, _ = gen.generate_ids(prompts, steps)
  reference = m.params.with_ffns(tuple(_DenseTopK(layer.ffn, k) for layer in m.params.layers))
  step = jax.jit(lambda p, c, t: forward(p, m.config, c, t))
  for prompt, result in zip(prompts, results):
    logits_BV, cache, _ = prefill(m.params, m.config, jnp.asarray([prompt]),
                                  jnp.zeros((1,), jnp.int32), None, 64)
    token, expected = int(jnp.argmax(logits_BV[0])), []
    for _ in range(steps):
      expected.append(token)
      logits, cache = step(reference, cache, jnp.asarray([[token]]))
      token = int(jnp.argmax(logits[0, -1]))
    assert result.token_ids == expected
  assert gen.compiled.compiles["decode"] == 1
  # the scorer's predictor rows generate what the predictor's Generator does
  scorer = ContinuationScorer(m.config, m.params, [Dense(), Predicted(spec, oracle)],
                              cache_len=64)
  for prompt, result in zip(prompts, results):
    assert scorer.generate(prompt, steps)["predictor"].token_ids == result.token_ids


def test_beta_one_equals_dense_and_the_decode_step_compiles_once(tiny):
  F, D, L = tiny.config.intermediate_size, tiny.config.hidden_size, tiny.config.num_layers
  rng = np.random.default_rng(0)
  art = _artefacts(tiny, range(L), rng.normal(size=(L, 8, D)).astype(np.float32),
                   rng.normal(size=(L, F, 8)).astype(np.float32))
  spec = core_spec(L, F, beta=1.0, sparse_layers="all")
  dense = Generator(tiny.config, tiny.params, cache_len=64)
  predicted = Generator(tiny.config, tiny.params, cache_len=64, policy=Predicted(spec, art))
  for lengths in ([5, 9], [13, 3]):
    prompts = random_prompts(lengths, seed=len(lengths) + lengths[0])
    assert ([r.token_ids for r in predicted.generate_ids(prompts, 8)[0]]
            == [r.token_ids for r in dense.generate_ids(prompts, 8)[0]])
  assert predicted.compiled.compiles["decode"] == 1
  half = core_spec(L, F, beta=0.5, sparse_layers="all")
  _, stats = Generator(tiny.config, tiny.params, cache_len=64,
                       policy=Predicted(half, art)).generate_ids(random_prompts([6]), 4)
  rows, predictor_bytes = 3 * D * F * 4, (8 * D + F * 8) * 4   # per layer, float32
  assert stats.ffn_bytes_fraction == pytest.approx((rows / 2 + predictor_bytes) / rows)


def test_train_command_builds_artefacts_that_generate_reads_and_mismatches_exit_2(
    tiny_llama_with_tokenizer, tmp_path):
  texts = tmp_path / "texts.txt"
  texts.write_text("\n".join(" ".join(["a b c the of"] * (3 + i % 4)) for i in range(24)))
  out = tmp_path / "pred"
  proc = run_script("train_predictor.py", f"--model={tiny_llama_with_tokenizer}",
                    f"--data={texts}", f"--out_dir={out}", "--sparse_layers=all", "--rank=8",
                    "--steps=20", "--batch_tokens=32", "--warmup_steps=2", "--noprogress")
  assert proc.returncode == 0, proc.stderr
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["layers"] == [0, 1, 2] and manifest["rank"] == 8
  assert set(manifest["recall"]) == {"0.8", "0.6", "0.4"}
  assert not [p for p in os.listdir(out) if p.startswith(".")]   # work folders cleared
  ok = run_generate(f"--model={tiny_llama_with_tokenizer}", "--prompt=a b", "--max_new_tokens=3",
                    "--method=predictor", f"--predictor_dir={out}", "--sparse_layers=all",
                    "--beta=0.5")
  assert ok.returncode == 0, ok.stderr
  data = tmp_path / "data" / "wikitext2_raw"
  data.mkdir(parents=True)
  (data / "wiki.test.raw").write_text(" ".join(["a b c the of d e"] * 80))
  evaluated = tmp_path / "eval.json"
  proc = run_script("evaluate.py", f"--model={tiny_llama_with_tokenizer}",
                    f"--data_dir={tmp_path / 'data'}", "--tasks=wikitext",
                    "--methods=dense,stability,predictor", f"--predictor_dir={out}",
                    "--betas=1,0.5", "--layer_sets=all", "--window_context=24",
                    "--window_continuation=24", "--windows=2", "--noprogress",
                    f"--json_out={evaluated}")
  assert proc.returncode == 0, proc.stderr
  results = {r["method"]: r for r in json.loads(evaluated.read_text())["results"]}
  assert (results["predictor/rank=8/beta=1"]["metrics"]["perplexity"]
          == pytest.approx(results["dense"]["metrics"]["perplexity"], rel=1e-4))
  # its bytes: half the rows and the predictor, r(D + F) of 3·D·F per layer
  assert results["predictor/rank=8/beta=0.5"]["ffn_bytes_fraction"] == pytest.approx(
      0.5 + 8 * (64 + 96) / (3 * 64 * 96))
  bench = tmp_path / "bench.json"
  proc = run_script("benchmark.py", f"--model={tiny_llama_with_tokenizer}",
                    "--methods=dense,stability,predictor", f"--predictor_dir={out}", "--betas=0.5",
                    "--sparse_layers=all", "--prompt_len=8", "--cache_len=32", "--decode_steps=2",
                    "--rounds=1", f"--json_out={bench}")
  assert proc.returncode == 0, proc.stderr
  runs = json.loads(bench.read_text())
  assert "predictor" in json.dumps(runs), runs
  wrong_layers = run_generate(f"--model={tiny_llama_with_tokenizer}", "--prompt=a",
                              "--method=predictor", f"--predictor_dir={out}",
                              "--sparse_layers=1:3")
  assert wrong_layers.returncode == 2
  assert "sparsified layers" in wrong_layers.stderr.strip().splitlines()[-1]
  # another checkpoint of the same shape: refused by its fingerprint (the
  # same check, in process: a subprocess per refusal is slow)
  other = tmp_path / "other"
  make_tiny_hf_model("llama_tied", seed=9).save_pretrained(str(other))
  config = loading.load_config(str(other))
  with pytest.raises(predictors.PredictorMismatchError, match="model fingerprint"):
    methods.load_predictor(str(out), config, loading.fingerprint(str(other)),
                           core_spec(config.num_layers, config.intermediate_size,
                                     sparse_layers="all").sparse_layers)
