"""Simulated hospitals for the demo, the tests and the benchmarks (``fedseg synth``).

Each site gets its own scanner, protocol and patient population, and writes real DICOM MR
series with tumour labels in their exact geometry; see :mod:`fedseg.synth.hospitals`.
"""
