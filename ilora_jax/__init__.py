"""ilora_jax: instance-wise LoRA (iLoRA) for LLM-based sequential recommendation in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name: str):
  if name == "recommend":  # `ilora_jax.recommend(workdir, history, ...)`, imported lazily.
    import importlib

    return importlib.import_module("ilora_jax.recommend")
  raise AttributeError(f"module 'ilora_jax' has no attribute {name!r}")
