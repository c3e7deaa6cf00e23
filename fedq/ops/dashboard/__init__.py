"""The dashboard: a read-only web view of runs in Redis (``fedq dashboard``).

``snapshot`` builds the facts (also used by ``fedq status``), ``readonly`` is the Redis
client that can only read, ``app`` is the web application. Importing this package does
not import the web framework.
"""
