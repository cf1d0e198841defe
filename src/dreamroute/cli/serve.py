"""``dreamroute serve``: the hierarchy as an OpenAI-compatible HTTP API (uvicorn, one worker)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from .common import ConfigOpt, DbOpt, console, handle_errors, settings_for
from ..config import ServerConfig, Settings
from ..errors import ConfigError


def serve_settings(config: Optional[Path], db: Optional[str], **flags) -> Settings:
    """Settings with the flags given (not None) laid over ``server:`` of the config and the
    environment. Raises ConfigError naming each bad value."""
    settings = settings_for(config, db)
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        server = ServerConfig.model_validate({**settings.server.model_dump(), **given})
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid server option: {bad}") from None
    return settings.model_copy(update={"server": server})


@handle_errors
def serve(host: Optional[str] = typer.Option(None, help="Interface to listen on (default 127.0.0.1)."),
          port: Optional[int] = typer.Option(None, min=0, max=65535, help="Port (default 8000)."),
          budget: Optional[float] = typer.Option(None, min=0, help="Average ATP per routed request, J."),
          policy: Optional[str] = typer.Option(None, help="Policy of model 'dreamroute': dreamroute | cascade[:T] | ..."),
          api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' "
                                                "(better: DREAMROUTE_SERVER__API_KEY, not visible in ps)."),
          config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Serve the routed hierarchy as an OpenAI-compatible API: /v1/chat/completions (model: a tier or
    'dreamroute'), /v1/models, /v1/feedback, /v1/trust, /metrics, /health."""
    import uvicorn

    from ..server import create_app
    settings = serve_settings(config, db, host=host, port=port, budget=budget, policy=policy, api_key=api_key)
    srv = settings.server
    app = create_app(settings)
    st = app.state.dreamroute
    console.print(f"[bold]dreamroute serve[/]: {', '.join(settings.tier_names)} on http://{srv.host}:{srv.port}/v1 "
                  f"(policy {st.dr.policy.name}, budget {srv.budget if srv.budget is not None else 'none'} J/request, "
                  f"auth {'on' if srv.api_key else 'off'}, fast path {'on' if srv.fast_path else 'off'}, "
                  f"store {settings.db_display})")
    # what was built to start (the backends, the memory loaded from the store) lives as long as the
    # process: kept out of the cyclic GC's scans, whose full collections otherwise stopped every
    # request for ~0.2 s (a gen-2 pass over that heap) every few hundred requests
    gc.freeze()
    uvicorn.run(app, host=srv.host, port=srv.port, workers=1, log_level="info", access_log=srv.access_log)
