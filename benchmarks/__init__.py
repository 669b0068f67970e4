"""The measurements behind the documentation's tables; run each from the repository root as ``python -m benchmarks.NAME``."""
