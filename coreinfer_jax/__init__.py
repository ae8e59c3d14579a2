"""coreinfer_jax: CoreInfer's sentence-level adaptive sparse activation, in JAX.

The thin public API. The sub-packages show the architecture:
  model/       config (explicit architecture fields), params (+ logical axes), FFN kinds,
               layers, cache, forward (with taps)
  checkpoint/  one module per architecture, safetensors and GGUF readers, strict conversion, loading
  core/        core spec, selection rules, taps, policies, gather, FFN stores, clusters,
               artefacts, byte accounting
  runtime/     compilation cache, batching, the selecting prefill, sampling, stopping, generator
  eval/        continuation scorer, task runners, tasks, datasets, metrics, lm-eval model
  offline/     clustering, per-layer β calibration
  analysis/    the paper's findings measured, plots
  bench/       bandwidth probe, timing, the transformers reference
  cli/         flags, help, output checks, the named-config overlay, entry points
  commands/    the command-line programs (coreinfer-generate, ...; scripts/*.py)

Importing the package is cheap: each name below imports its module (and JAX)
when first used, so the command-line entry points can handle Ctrl-C while
JAX loads.
"""

import importlib

_PUBLIC = {
    "ContinuationScorer": "coreinfer_jax.eval.scorer",
    "CorePolicy": "coreinfer_jax.core.policy",
    "CoreSpec": "coreinfer_jax.core.spec",
    "Dense": "coreinfer_jax.core.policy",
    "Generator": "coreinfer_jax.runtime.generator",
    "LoadedModel": "coreinfer_jax.checkpoint",
    "ModelConfig": "coreinfer_jax.model.config",
    "SamplingConfig": "coreinfer_jax.runtime.sampling",
    "Similarity": "coreinfer_jax.core.policy",
    "Stability": "coreinfer_jax.core.policy",
    "core_spec": "coreinfer_jax.core.spec",
    "load_config": "coreinfer_jax.checkpoint",
    "load_model": "coreinfer_jax.checkpoint",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
  if name not in _PUBLIC:
    raise AttributeError(f"module 'coreinfer_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__():
  return __all__
