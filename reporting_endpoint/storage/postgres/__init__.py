"""The PostgreSQL storage backend (asyncpg), for several ingest processes and hosts sharing one
database: the same tables and roll-ups as the SQLite backend, with ``reports`` partitioned by
UTC day so retention drops whole partitions.

``migrations/`` holds the numbered schema files and ``migrate.py`` applies them exactly once
under an advisory lock, however many processes start together. The backend class (writer with
group commit, read pool) lives beside them; nothing outside ``storage/postgres/`` imports
asyncpg or writes PostgreSQL SQL.
"""
