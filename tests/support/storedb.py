"""Databases for the PostgreSQL recording store, on a ``PgServer``.

``StoreDatabases(pg)`` creates the login role ``gk_store`` (password in
``password``; its statements are not logged, so the server log shows only what
clients sent through gatekeep) and hands out fresh databases it owns::

    dbs = StoreDatabases(pg_server)
    db = dbs.create()            # StoreDb: name, url, connect (psycopg2 kwargs), params
    config["store"] = {"url": db.url, "password": "env:GK_STORE_PW"}
    env = {"GK_STORE_PW": dbs.password}
    db.execute("UPDATE ledger SET ...")   # as the owner, for tampering
    dbs.drop(db)
"""

import itertools
import secrets

import attrs
import psycopg2

ROLE = "gk_store"
PASSWORD_ENV = "GK_STORE_PW"
_counter = itertools.count(1)


@attrs.frozen
class StoreDb:
    name: str
    host: str
    port: int
    password: str

    @property
    def url(self):
        return "postgresql://%s@%s:%d/%s?sslmode=disable" % (ROLE, self.host, self.port, self.name)

    @property
    def params(self):
        """libpq parameters without the password (what gatekeep reads from the URL)."""
        return {"host": self.host, "port": str(self.port), "user": ROLE, "dbname": self.name, "sslmode": "disable"}

    @property
    def connect(self):
        return dict(self.params, password=self.password, connect_timeout="5")

    def store_config(self):
        """The ``store:`` mapping for a gatekeep configuration (password from $GK_STORE_PW)."""
        return {"url": self.url, "password": "env:" + PASSWORD_ENV}

    def execute(self, sql, params=None):
        """Run statements as the database owner (autocommit); returns rows of the last one, if any."""
        conn = psycopg2.connect(**self.connect)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description is not None else None
        finally:
            conn.close()


class StoreDatabases:
    def __init__(self, pg):
        self.pg = pg
        self.password = secrets.token_hex(16)
        pg.admin_psql("SET log_statement = 'none';\n"
                      "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '%s') THEN "
                      "CREATE ROLE %s LOGIN; END IF; END$$;\n"
                      "ALTER ROLE %s PASSWORD '%s';\n"
                      "ALTER ROLE %s SET log_statement = 'none';\n" % (ROLE, ROLE, ROLE, self.password, ROLE))

    @property
    def env(self):
        return {PASSWORD_ENV: self.password}

    def create(self, prefix="gkstore"):
        name = "%s_%d_%s" % (prefix, next(_counter), secrets.token_hex(3))
        self.pg.admin_psql("CREATE DATABASE %s OWNER %s;" % (name, ROLE))
        return StoreDb(name, self.pg.host, self.pg.port, self.password)

    def drop(self, db):
        if self.pg.running:
            self.pg.admin_psql("DROP DATABASE IF EXISTS %s WITH (FORCE);" % db.name, check=False)
