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
  cli/         flags, the named-config overlay, script entry point
"""

from coreinfer_jax.checkpoint import LoadedModel, load_config, load_model
from coreinfer_jax.core.policy import CorePolicy, Dense, Similarity, Stability
from coreinfer_jax.core.spec import CoreSpec, core_spec
from coreinfer_jax.eval.scorer import ContinuationScorer
from coreinfer_jax.model.config import ModelConfig
from coreinfer_jax.runtime.generator import Generator
from coreinfer_jax.runtime.sampling import SamplingConfig

__all__ = ["ContinuationScorer", "CorePolicy", "CoreSpec", "Dense", "Generator", "LoadedModel",
           "ModelConfig", "SamplingConfig", "Similarity", "Stability", "core_spec", "load_config",
           "load_model"]
