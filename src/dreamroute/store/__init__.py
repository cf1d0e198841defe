"""The store: SQLAlchemy over SQLite or PostgreSQL, every learned fact that must survive a
restart, and the hash-chained ledger of trust changes (store.py is the entry point)."""
