"""What the scripts share: named configs, model loading from flags, errors.

A named config (`configs/NAME.json`) gives defaults; a flag set explicitly on
the command line overrides it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Dict, Optional

import jax.numpy as jnp
from absl import flags
from absl import logging as absl_logging

from coreinfer_jax import artefacts, loading, texts
from coreinfer_jax.config import ModelConfig, UnsupportedConfigError, config_from_hf
from coreinfer_jax.core import SCORINGS, CoreSpec, core_spec, parse_beta
from coreinfer_jax.convert import CheckpointError, random_params
from coreinfer_jax.generation import default_dtype

# Errors a user can cause with bad input: reported in one line, exit status 2.
USER_ERRORS = (ValueError, FileNotFoundError, UnsupportedConfigError, CheckpointError)
# (artefacts.ClusterMismatchError is a ValueError)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The checkout's configs/ folder (scripts run from a checkout or editable install).
REPO_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def define_model_flags(configs_dir: str = REPO_CONFIGS_DIR) -> None:
  flags.DEFINE_string("model", None, "Hugging Face checkpoint folder or .gguf file "
                      "(default: the embedded SmolLM2-135M-Instruct)")
  flags.DEFINE_string("config", "default", "named config: a file NAME.json in --configs_dir")
  flags.DEFINE_string("configs_dir", configs_dir, "folder of named configs")
  flags.DEFINE_enum("dtype", "auto", ["auto"] + sorted(DTYPES), "compute dtype "
                    "(auto: float32 on CPU, bfloat16 on GPU/TPU)")
  flags.DEFINE_integer("cache_len", 1024, "KV cache length (prompt bucket + new tokens must fit)")


METHODS = ("dense", "stability", "similarity")
SPEC_FLAGS = ["beta", "alpha", "scoring", "sparse_layers", "beta_file"]
CORE_FLAGS = ["method", "cluster_dir"] + SPEC_FLAGS


def define_core_flags(with_method: bool = True) -> None:
  """The `SPEC_FLAGS` (core settings), and with `with_method` the method and
  the cluster artefacts of similarity-guided decoding (`CORE_FLAGS`)."""
  if with_method:
    flags.DEFINE_string("method", "dense", f"decoding method: {' | '.join(METHODS)}")
    flags.DEFINE_string("cluster_dir", None, "similarity: the folder scripts/cluster.py wrote")
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


def texts_from_flags(limit: Optional[int]) -> texts.TextSet:
  FLAGS = flags.FLAGS
  return texts.load_texts(FLAGS.dataset, FLAGS.data_dir, text_key=FLAGS.text_field,
                          label_key=FLAGS.label_field, limit=limit)


def core_spec_for(method: str, s: Dict[str, Any], config: ModelConfig,
                  beta: Optional[str] = None) -> Optional[CoreSpec]:
  """The validated `CoreSpec` of a method (None for dense) from the settings of
  `CORE_FLAGS`; `beta` overrides `s["beta"]`."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
  if method == "dense":
    return None
  return core_spec(config.num_layers, config.intermediate_size,
                   beta=parse_beta(s["beta"] if beta is None else beta), alpha=s["alpha"],
                   scoring=s["scoring"], sparse_layers=s["sparse_layers"], beta_file=s["beta_file"])


def model_fingerprint(model: Optional[str], shape: Optional[str] = None, seed: int = 0) -> str:
  """What `load` will report as the model's fingerprint, without loading it."""
  return f"random:{shape}:{seed}" if shape else loading.fingerprint(model or loading.default_model_path())


def clusters_for(method: str, cluster_dir: Optional[str], config: ModelConfig,
                 spec: Optional[CoreSpec], fingerprint: str) -> Optional[artefacts.ClusterArtefacts]:
  """Similarity: the artefacts in `cluster_dir`, checked against the model and
  the core settings asked for (before any weights load); None otherwise."""
  if method != "similarity":
    if cluster_dir:
      raise ValueError(f"--cluster_dir is only used by --method=similarity, not {method}")
    return None
  if not cluster_dir:
    raise ValueError("--method=similarity needs --cluster_dir (built by scripts/cluster.py)")
  art = artefacts.load(cluster_dir)   # small arrays: checked before any weights load
  artefacts.check_compatible(cluster_dir, art.manifest, config=config, fingerprint=fingerprint,
                             spec=spec)
  return art


def load_named_config(configs_dir: str, name: str) -> Dict[str, Any]:
  path = os.path.join(configs_dir, f"{name}.json")
  if not os.path.isfile(path):
    available = sorted(f[:-5] for f in os.listdir(configs_dir) if f.endswith(".json"))
    raise FileNotFoundError(f"no config named {name!r} in {configs_dir} (available: {available})")
  with open(path) as fh:
    return json.load(fh)


def settings(FLAGS, names) -> Dict[str, Any]:
  """Flag values by name: the named config's value unless the flag was set."""
  named = load_named_config(FLAGS.configs_dir, FLAGS.config)
  return {n: FLAGS[n].value if FLAGS[n].present or n not in named else named[n] for n in names}


def resolve_dtype(name: str):
  return default_dtype() if name == "auto" else DTYPES[name]


def shape_hf_config(configs_dir: str, shape: str, num_layers: Optional[int] = None) -> Dict[str, Any]:
  """A model shape's Hugging Face config dict (`configs/shapes/NAME.json`)."""
  hf = load_named_config(os.path.join(configs_dir, "shapes"), shape)
  return dict(hf, num_hidden_layers=num_layers) if num_layers else hf


def model_config(model: Optional[str], shape: Optional[str] = None, configs_dir: str = "",
                 num_layers: Optional[int] = None) -> ModelConfig:
  """The config alone, cheaply: settings are checked against it before loading."""
  if shape:
    return config_from_hf(shape_hf_config(configs_dir, shape, num_layers))
  return loading.load_config(model)


def load(model: Optional[str], dtype, shape: Optional[str] = None, configs_dir: str = "",
         num_layers: Optional[int] = None, seed: int = 0):
  """(LoadedModel, load seconds). A `shape` gives random weights, no tokenizer."""
  t0 = time.perf_counter()
  if shape:
    config = model_config(model, shape, configs_dir, num_layers)
    m = loading.LoadedModel(config, random_params(config, seed, dtype), None,
                            f"random:{shape}", model_fingerprint(model, shape, seed))
  else:
    m = loading.load_model(model, dtype)
  return m, time.perf_counter() - t0


def run_main(main):
  """Wraps an absl main: a user error prints one line and exits with status 2."""
  def wrapped(argv):
    # JAX logs at INFO that TPU/GPU backends are absent; not news on a CPU run.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    if not flags.FLAGS["verbosity"].present:   # orbax logs every save at INFO
      absl_logging.set_verbosity(absl_logging.WARNING)
    try:
      return main(argv)
    except USER_ERRORS as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  return wrapped


def write_json(path: Optional[str], payload: Any) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    json.dump(payload, fh, indent=2)
  os.replace(tmp, path)
