"""``python -m dreamroute.cli``: the same command line as ``dreamroute``."""

from .main import app

app(prog_name="dreamroute")
