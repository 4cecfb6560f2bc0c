"""Helpers of ``benchmarks/peers.py``: stored-size accounting, the peer quantizers, timing, output.

Named ``_peers`` rather than ``peers``: a package ``peers/`` beside ``peers.py`` would shadow the
script's own module name whenever it is imported as ``peers``.
"""
