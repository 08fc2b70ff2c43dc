"""Server-side pieces NVFlare does not ship.

HE-aware workflows, aggregation extras and the federation report roll-up.
"""
