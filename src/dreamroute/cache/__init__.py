"""The reality cache: conversation KV states on disk (:mod:`dreamroute.cache.reality`)."""

from .reality import CachedState, RealityCache

__all__ = ["CachedState", "RealityCache"]
