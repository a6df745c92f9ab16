"""The MoE + MTP transformer.

Shape legend for tensor names (`x_BxLxD`):
  B batch · L length (query) · S length (key) · D model width · F FFN width
  H query heads · G key/value heads · K per-head dim (or top-k, where routing)
  E experts · C expert capacity · T tokens (B*L) · M MTP depth · V vocabulary · R latent rank
"""

from mtp_jax.model.transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer"]
