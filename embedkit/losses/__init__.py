"""Contrastive losses over embeddings: ``loss(q [B,D], p [B,D], n [B,K,D] | None) -> LossOutput``."""
