"""The MoE + MTP transformer.

Tensor names may carry their shape (`x_BxLxD`). These letters mean the same in every file of
mtp_jax:
  B batch (rows) · L length (queries) · S length (keys, cache slots) · D model width
  F FFN width · H query heads · G key/value heads · E experts · V vocabulary
A file that needs other letters (K, T, C, ...) says what they mean in a short legend at its top,
and each keeps that one meaning in the file. Inside a shard_map body the sizes are per device;
each body says which.
"""

from mtp_jax.model.transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer"]
