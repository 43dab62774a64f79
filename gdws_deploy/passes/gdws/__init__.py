"""GDWS: per-channel SVD, LEGO/MEGO and budgets, the rewrite and its lowerings."""
