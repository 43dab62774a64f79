"""The model as loaded and analyzed once (shapes, MACs, eligible layers), and parity."""
