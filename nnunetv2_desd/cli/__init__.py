"""Console entry points, one module per command; each parses its options and calls the pipeline."""
