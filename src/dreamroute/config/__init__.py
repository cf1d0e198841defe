"""Typed configuration, defined once: YAML files, ``DREAMROUTE_*`` environment variables
and CLI flags all feed these classes. The floor under everything but :mod:`dreamroute.errors`:
it imports no other part of dreamroute.
"""

from .db_url import hide_password, is_server_url, is_url
from .metabolic import MetabolicConfig
from .policy import PolicySpec, parse_policy
from .router import CONTEXTS, RouterConfig
from .settings import CacheConfig, ServerConfig, Settings, StoreConfig, default_data_dir, load_settings
from .tiers import DEFAULT_IN_FLIGHT, ModelSource, PackagePart, TierConfig, default_in_flight, default_tiers

__all__ = ["CONTEXTS", "DEFAULT_IN_FLIGHT", "CacheConfig", "MetabolicConfig", "ModelSource", "PackagePart",
           "PolicySpec", "RouterConfig", "ServerConfig", "Settings", "StoreConfig", "TierConfig",
           "default_data_dir", "default_in_flight", "default_tiers", "hide_password", "is_server_url",
           "is_url", "load_settings", "parse_policy"]
