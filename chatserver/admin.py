"""chatserver-admin: operator commands that are not the server itself.

``chatserver-admin migrate`` applies the schema migrations the configured
database lacks. The server checks the schema at start and refuses to run
against one it does not know, so a deploy runs this first.
"""

from __future__ import annotations

import argparse
import os
import sys

from chatserver.config import ConfigError, load


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML configuration file")
    common.add_argument("--database-url", help="overrides database_url")
    parser = argparse.ArgumentParser(prog="chatserver-admin")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", parents=[common], help="apply pending schema migrations")
    args = parser.parse_args(argv)
    try:
        config = load(args.config, os.environ, {"database_url": args.database_url})
    except ConfigError as e:
        print(f"chatserver-admin: {e}", file=sys.stderr)
        return 2
    if args.command == "migrate":
        # Say which database: without --config or the environment this is the
        # SQLite default, which is rarely what an operator meant to migrate.
        print(f"database: {_without_password(config.database_url)}")
        if config.is_sqlite:
            from chatserver.store import sqlite

            sqlite.prepare(config.database_url)
        else:
            from chatserver.store import postgres

            applied = postgres.migrate_database(config.database_url)
            print(f"applied migrations: {applied or 'none (up to date)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
