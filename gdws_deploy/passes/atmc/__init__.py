"""ATMC (Gui et al., NeurIPS 2019): low rank, sparse residual, k-means weight sharing."""
