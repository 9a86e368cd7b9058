"""Pre-training methods, one module each; ``registry`` lists them."""
