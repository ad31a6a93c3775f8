"""The PostgreSQL protocol plugin (``protocol: postgres``)."""

from gatekeep.protocols.postgres.plugin import PostgresPlugin

postgres = PostgresPlugin()
