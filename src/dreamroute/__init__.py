"""dreamroute: route each request to the cheapest local model that can be trusted with it."""

from .api import DreamRoute
from .config import Settings, TierConfig, load_settings
from .errors import (BackendError, ConfigError, DreamrouteError, LedgerError, ModelFileError, StoreError,
                     UnknownTierError, WorkloadError)

__version__ = "0.1.0"
__all__ = ["DreamRoute", "Settings", "TierConfig", "load_settings", "DreamrouteError", "ConfigError",
           "UnknownTierError", "ModelFileError", "BackendError", "WorkloadError", "StoreError", "LedgerError",
           "__version__"]
