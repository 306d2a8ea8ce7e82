"""ilora_jax: instance-wise LoRA (iLoRA) for LLM-based sequential recommendation in JAX/Flax."""

__version__ = "0.1.0"
