"""Compression passes: which layers each can take, what a layer can become, how to write it."""
