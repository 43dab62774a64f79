"""What the verbs print: rich tables of API results, progress bars on stderr terminals."""
