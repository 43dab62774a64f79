"""What a conversion costs in robustness: mirror, attacks, evaluation, alphas, data."""
