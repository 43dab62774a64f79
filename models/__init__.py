"""Model definitions, export helper and the bundled robust demo model."""
