"""Thin ``nn.Module`` objectives over ``losskit.functional``.

Every submodule of this package is imported by the registry on first use, so
a new objective only needs its own file with ``@register(...)``.
"""
