"""``dreamroute bench``: each tier's ATP calibration (load, TTFT, prefill and decode speed,
RSS), or with ``--kv`` the reality cache's TTFT cold against restored."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..config import Settings
from .common import ConfigOpt, DbOpt, console, handle_errors, settings_for


@handle_errors
def bench(tier: Optional[list[str]] = typer.Option(None, "--tier", help="Tiers to bench (default: all llama tiers)."),
          repeats: int = typer.Option(3, help="Measure each speed this many times; keep the fastest."),
          json_path: Optional[Path] = typer.Option(None, "--json", help="Write a list with one object per tier."),
          kv: bool = typer.Option(False, "--kv", help="Measure the reality cache instead: follow-up TTFT cold vs "
                                  "restored at 500/2000/4000 tokens, warm handoff, bytes per cached token."),
          n_ctx: int = typer.Option(8192, min=512, help="With --kv: context size of the tiers measured."),
          config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Benchmark each tier (load, TTFT, prefill and decode tokens/s, RSS) and store the ATP calibration.

    With --kv, benchmark the reality cache on one tier (--tier, default tactical) and the
    handoff to the tier above it; nothing is stored.
    """
    from ..backends import make_backend
    from ..bench.calibrate import bench_tier
    from ..eval.runner import write_json
    from ..store.store import Store
    settings = settings_for(config, db)
    if kv:
        _bench_kv(settings, (tier or ["tactical"])[0], n_ctx, json_path)
        return
    names = tier or [t.name for t in settings.tiers if t.backend != "scripted"]
    rows = []
    with Store(settings.db_path, instance_id=settings.store.instance_id) as store:
        for name in names:
            t = settings.tier(name)
            console.print(f"benchmarking {name} ({t.model}) ...")
            backend = make_backend(t, settings)
            try:
                r = bench_tier(backend, t, repeats=repeats)
            finally:
                backend.close()
            store.save_calibration(r["identity"], name, r)
            rows.append(r)
    table = Table(title="dreamroute bench")
    keys = ["tier", "model", "load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "rss_mb"]
    for k in keys:
        table.add_column(k, justify="left" if k in ("tier", "model") else "right")
    for r in rows:
        table.add_row(*[f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys])
    console.print(table)
    if json_path:
        write_json(json_path, [{k: r[k] for k in keys} for r in rows])
        console.print(f"wrote {json_path}")


def _bench_kv(settings: Settings, name: str, n_ctx: int, json_path: Optional[Path]) -> None:
    from ..backends import make_backend
    from ..bench.kv import bench_kv
    from ..eval.runner import write_json
    settings.tier(name)
    names = settings.tier_names
    up = names[names.index(name) + 1] if names.index(name) + 1 < len(names) else None
    backends = {}
    for t in settings.tiers:
        if t.name in (name, up):
            backends[t.name] = make_backend(t.model_copy(update={"n_ctx": max(t.n_ctx, n_ctx)}), settings)
    console.print(f"reality cache on {name} (handoff to {up or 'none'}), n_ctx {n_ctx} ...")
    try:
        res = bench_kv(backends, name, up)
    finally:
        for b in backends.values():
            b.close()
    table = Table(title=f"dreamroute bench --kv ({name})")
    for k in ("context tokens", "TTFT cold s", "TTFT restored s", "speedup", "state MB"):
        table.add_column(k, justify="right")
    for p in res["points"]:
        table.add_row(str(p["context_tokens"]), f"{p['ttft_cold_s']:.2f}", f"{p['ttft_restored_s']:.3f}",
                      f"{p['speedup']:.1f}x", f"{p['state_bytes'] / 1e6:.1f}")
    console.print(table)
    console.print(f"bytes per cached token {res.get('bytes_per_token', float('nan')):.0f} "
                  f"(theoretical KV {res['theoretical_bytes_per_token']})")
    if "handoff" in res:
        h = res["handoff"]
        console.print(f"handoff to {h['tier']} at {h['context_tokens']} tokens: TTFT cold {h['ttft_cold_s']:.2f} s, "
                      f"warm {h['ttft_warm_s']:.3f} s ({h['speedup']:.1f}x)")
    if json_path:
        write_json(json_path, res)
        console.print(f"wrote {json_path}")
