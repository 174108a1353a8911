"""item-jax: ITEm image + title embeddings for eCommerce, in JAX/Flax."""

__version__ = "0.1.0"
