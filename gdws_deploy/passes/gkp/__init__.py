"""Grouped kernel pruning: the numpy math, the MAC allocation and the grouped rewrite."""
