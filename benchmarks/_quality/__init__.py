"""Helpers of ``benchmarks/quality.py``: data, the scalar-quantization baseline, the tasks, the methods, output.

Named ``_quality`` rather than ``quality``: a package ``quality/`` beside ``quality.py`` would shadow
the script's own module name whenever it is imported as ``quality``.
"""
