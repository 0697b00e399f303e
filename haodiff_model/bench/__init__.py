"""Benchmarks, one command each: `python -m haodiff_model.bench.gpu | .osd | .data | .learn`."""
