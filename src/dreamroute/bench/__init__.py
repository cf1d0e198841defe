"""Measurements of this machine that the router uses: ATP calibration of each tier
(:mod:`.calibrate`, ``dreamroute bench``) and KV-cache reuse (:mod:`.kv`, ``dreamroute bench --kv``)."""
