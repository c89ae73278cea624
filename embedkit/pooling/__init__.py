"""Pooling heads: ``(hidden [B,T,H], mask [B,T], all_layers) -> [B, D]``. One file per head."""
