"""The flags the scripts share: model, core settings, text datasets."""

from __future__ import annotations

from typing import Optional

from absl import flags
from jax.sharding import Mesh

from coreinfer_jax.checkpoint.named import DEFAULT_MODEL, NAMED_MODELS
from coreinfer_jax.core.methods import METHODS, SPEC_SETTINGS
from coreinfer_jax.core.spec import CORE_PLACEMENTS, CORE_SHARINGS, SCORINGS, TOP_M_ALGORITHMS
from coreinfer_jax.eval import datasets
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.runtime import distributed
from coreinfer_jax.runtime import mesh as meshes
from coreinfer_jax.runtime import offload
from coreinfer_jax.runtime.batching import DTYPES

FLAGS = flags.FLAGS
CORE_FLAGS = (["method", "cluster_dir", "predictor_dir", "core_placement", "core_sharing", "top_m",
               "importance", "importance_weight"] + list(SPEC_SETTINGS))


def define_model_flags() -> None:
  flags.DEFINE_string("model", None, "Hugging Face checkpoint folder, .gguf file or named "
                      f"model ({', '.join(NAMED_MODELS)}; `python -m "
                      "coreinfer_jax.cli.named_models` lists them; default: "
                      f"{DEFAULT_MODEL})")
  flags.DEFINE_enum("dtype", "auto", ["auto"] + sorted(DTYPES), "compute dtype "
                    "(auto: float32 on CPU, bfloat16 on GPU/TPU)")
  flags.DEFINE_integer("cache_len", 1024, "KV cache length (prompt bucket + new tokens must fit)")


def define_mesh_flags() -> None:
  flags.DEFINE_integer("tp", 1, "tensor parallel: shard the model over this many devices, of "
                       "every process (heads, FFN neurons, vocabulary; XLA_FLAGS="
                       "--xla_force_host_platform_device_count=N gives N CPU devices)")
  flags.DEFINE_string("coordinator_address", None, "several hosts: HOST:PORT of process 0 "
                      "(jax.distributed; default: JAX_COORDINATOR_ADDRESS or the cluster's)")
  flags.DEFINE_integer("num_processes", None, "several hosts: how many processes run this command")
  flags.DEFINE_integer("process_id", None, "several hosts: this process's index (0 writes the output)")


def mesh_from_flags(config: ModelConfig) -> Optional[Mesh]:
  """Starts `jax.distributed` if the flags ask for several processes, then
  the `--tp` mesh (None for one device), checked against the model."""
  distributed.start(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  return meshes.tensor_parallel_mesh(config, FLAGS.tp)


def define_offload_flags() -> None:
  flags.DEFINE_boolean("offload_ffn", False, "memory-limit mode: sparse runs keep the sparsified "
                       "layers' FFN weights in host memory (pinned_host), only their core rows "
                       "reach the device (dense runs stay resident: they read every weight)")
  flags.DEFINE_enum("offload_gather", "device", offload.GATHER_SIDES, "with --offload_ffn, where "
                    "the core rows are picked: device (each layer's FFN copied in, then gathered) "
                    "or host (gathered on the host, only the k rows copied; one device)")


def define_random_input_flags() -> None:
  """The timing commands' model shape (random weights) and random prompt."""
  flags.DEFINE_string("shape", None, "a model shape in configs/shapes (random weights, real shape)")
  flags.DEFINE_integer("num_layers", None, "with --shape: override the depth (to fit memory)")
  flags.DEFINE_integer("prompt_len", 128, "prompt tokens (random ids)")


def define_core_flags(with_method: bool = True) -> None:
  """The core settings (`SPEC_SETTINGS`), and with `with_method` the method and
  the cluster artefacts of similarity-guided decoding (`CORE_FLAGS`)."""
  if with_method:
    flags.DEFINE_string("method", "dense", f"decoding method: {' | '.join(METHODS)}")
    flags.DEFINE_string("cluster_dir", None, "similarity: the folder scripts/cluster.py wrote")
    flags.DEFINE_string("predictor_dir", None, "predictor: the folder scripts/train_predictor.py "
                        "wrote (each token's top round(β·F) neurons, --sparse_layers as trained)")
    flags.DEFINE_enum("core_placement", "local", list(CORE_PLACEMENTS), "with --tp: local "
                      "takes k/tp core neurons from each device's own block (balanced); global "
                      "the top k overall, each row on the device owning it (unbalanced)")
    flags.DEFINE_enum("core_sharing", "per_sequence", list(CORE_SHARINGS), "per_sequence: each "
                      "prompt of a batch its own core set; shared: one set for the batch, "
                      "chosen over all its prompts' tokens (a step reads k rows whatever B)")
    flags.DEFINE_enum("top_m", "bisection", list(TOP_M_ALGORITHMS), "how selection finds each "
                      "token's top m neurons (signed, magnitude): bisection (fastest on CPU) or "
                      "lax.top_k; the same core sets either way")
    flags.DEFINE_string("importance", None, "stability: a model-global importance file "
                        "(scripts/importance.py, same scoring and α) mixed with each prompt's "
                        "keys")
    flags.DEFINE_float("importance_weight", 0.5, "with --importance: its weight w in (1 − w) · "
                       "the prompt's share + w · the global importance (0: the prompt's own set)")
  flags.DEFINE_string("beta", "0.4", "kept fraction of FFN neurons in each sparsified layer: "
                      "one value, or a comma list with one value per sparsified layer")
  flags.DEFINE_float("alpha", 0.2, "token-wise core fraction (signed, magnitude scorings)")
  flags.DEFINE_string("scoring", "signed", f"core-neuron scoring: {' | '.join(SCORINGS)}")
  flags.DEFINE_string("sparse_layers", "paper", "sparsified layers: 'paper' (the official "
                      "5..26 of 32, as a fraction of depth), 'all', 'A:B' or a comma list")
  flags.DEFINE_string("beta_file", None, "JSON with one β per model layer (null: dense); "
                      "replaces --beta and --sparse_layers")


def define_dataset_flags() -> None:
  """The text dataset of scripts/cluster.py and scripts/analyze.py."""
  flags.DEFINE_string("dataset", "truthfulqa", "truthfulqa (read from --data_dir) or a .txt "
                      "(one text per line), .jsonl or .csv file")
  flags.DEFINE_string("data_dir", None, "folder holding the named datasets")
  flags.DEFINE_string("text_field", "text", ".jsonl field or .csv column holding the text")
  flags.DEFINE_string("label_field", None, ".jsonl field or .csv column holding a group label")
  flags.DEFINE_integer("batch_size", 8, "texts per prefill batch")
  flags.DEFINE_integer("max_tokens", 256, "tokens kept per text (longer texts are truncated)")


def texts_from_flags(limit: Optional[int]) -> datasets.TextSet:
  return datasets.load_texts(FLAGS.dataset, FLAGS.data_dir, text_key=FLAGS.text_field,
                             label_key=FLAGS.label_field, limit=limit)
