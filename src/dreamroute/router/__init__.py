"""The router: one loop for live and replayed requests (engine.py), the policies it asks, and
the learned state it decides from (ARCHITECTURE.md, "The path of a request")."""
