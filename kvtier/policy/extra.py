"""Policies beyond the built-in ones; importing this module registers them."""
from . import prefix  # noqa: F401  (registers "prefix")
