"""MONAI-style image transforms of fedseg: array transforms with dictionary twins (Xxx / Xxxd).

Pure functions of their inputs; nothing here imports NVFlare.
"""
