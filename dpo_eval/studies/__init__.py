"""Results across runs or settings: compare, trend, quantization, per source, diagnostics, reward scores.
May import: any part of the core; never Prefect.
"""
