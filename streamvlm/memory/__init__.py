"""Bounded streaming memory: the ledger keeps the books, the cache adapter edits tensors, policies decide
what to keep, the long-term store holds what was evicted, and positions are re-rotated, never shifted bare."""
