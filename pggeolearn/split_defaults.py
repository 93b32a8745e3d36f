"""The defaults of ``chips split`` (block side, ratios), apart from :mod:`pggeolearn.splits` so
that the command line shows them without importing numpy (start-up time)."""

DEFAULT_BLOCK_M = 120.0
DEFAULT_RATIOS = (0.7, 0.15, 0.15)
