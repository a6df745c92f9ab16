"""mtp-jax: a JAX/Flax trainer for mixture-of-experts transformers with multi-token prediction."""

__version__ = "0.1.0"
