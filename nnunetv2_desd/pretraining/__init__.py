"""Self-supervised pre-training: views, heads, methods (DeSD, CADS, ReFs), the engine and the run configuration."""
