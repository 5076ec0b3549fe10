"""Annotate-only filters, registered by name; importing this package registers the built-in ones."""

from mm1data.filters import c4, clip, gopher, image, interleaved, lang, text  # noqa: F401
from mm1data.filters.base import Filter, FilterChain, FilterConfig, apply_chain, parse_chain

__all__ = ["Filter", "FilterChain", "FilterConfig", "apply_chain", "parse_chain"]
