"""Load benchmarks (``make bench`` runs ``python -m tests.bench.load``); not collected by pytest."""
