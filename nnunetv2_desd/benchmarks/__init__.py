"""Speed and memory benchmarks, one module each, plus their shared timing, memory and report code (``timing``)."""
