"""The OpenAI-compatible server (``dreamroute serve``): :func:`create_app` builds it."""

from .app import create_app
from .handlers import derive_conversation_id

__all__ = ["create_app", "derive_conversation_id"]
