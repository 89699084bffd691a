"""Configuration: file < environment < command line, and clear errors that name the setting."""

from __future__ import annotations

import pytest

from chatserver.config import Config, ConfigError, load


def test_defaults_are_the_embedded_setup(monkeypatch):
    monkeypatch.delenv("PORT", raising=False)
    c = load(None, {}, {})
    assert c.listen == ("tcp:8080:backlog=1024",)
    assert c.auth == "none" and c.redis_url is None
    assert c.database_url == "sqlite:///chatserver.sqlite3"


def test_port_from_the_environment_like_a_paas(monkeypatch):
    monkeypatch.setenv("PORT", "5005")
    assert load(None, {}, {}).listen == ("tcp:5005:backlog=1024",)


def test_precedence_file_env_cli(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('max_body_chars = 10\ndb_pool_size = 3\nlisten = ["tcp:1", "tcp:2"]\n')
    assert load(str(f), {}, {}).max_body_chars == 10
    env = {"CHATSERVER_MAX_BODY_CHARS": "20", "CHATSERVER_LISTEN": "tcp:3,tcp:4"}
    c = load(str(f), env, {})
    assert c.max_body_chars == 20 and c.db_pool_size == 3 and c.listen == ("tcp:3", "tcp:4")
    c = load(str(f), env, {"max_body_chars": "30", "listen": ["tcp:5"]})
    assert c.max_body_chars == 30 and c.listen == ("tcp:5",)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CHATSERVER_MAX_BODY_CHARS": "lots"}, "max_body_chars"),
        ({"CHATSERVER_MAX_BODY_CHARS": "0"}, "max_body_chars"),
        ({"CHATSERVER_DB_POOL_SIZE": "-1"}, "db_pool_size"),
        ({"CHATSERVER_AUTH": "magic"}, "auth"),
        ({"CHATSERVER_AUTH": "token"}, "jwt_secret"),
        ({"CHATSERVER_DATABASE_URL": "mysql://x"}, "database_url"),
        ({"CHATSERVER_REDIS_URL": "http://x"}, "redis_url"),
        ({"CHATSERVER_GAP_TIMEOUT": "0"}, "gap_timeout"),
        ({"CHATSERVER_STORE_WRITERS": "0"}, "store_writers"),
        ({"CHATSERVER_STORE_GATHER": "-0.001"}, "store_gather"),
        ({"CHATSERVER_STORE_GATHER": "1.001"}, "store_gather"),
        ({"CHATSERVER_DB_POOL_SIZE": "2", "CHATSERVER_STORE_WRITERS": "3"}, "store_writers"),
    ],
)
def test_bad_settings_are_named(env, named):
    with pytest.raises(ConfigError, match=named):
        load(None, env, {})


def test_unknown_key_in_file_is_refused(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("max_body_charz = 10\n")
    with pytest.raises(ConfigError, match="max_body_charz"):
        load(str(f), {}, {})


def test_config_is_frozen():
    c = Config()
    with pytest.raises(AttributeError):
        c.auth = "token"  # type: ignore[misc]


def test_example_file_documents_every_setting():
    from pathlib import Path

    from chatserver.config import SETTINGS

    example = (Path(__file__).parent.parent / "config" / "chatserver.toml").read_text()
    for name in SETTINGS:
        assert f"{name} =" in example, name
    # Its values, uncommented, are valid.
    import tomllib

    lines = [ln.removeprefix("# ") for ln in example.splitlines() if not ln.startswith("##")]
    values = tomllib.loads("\n".join(ln for ln in lines if " = " in ln))
    skip = {"jwt_secret", "auth"} | {k for k in values if k.endswith("_file")}
    # Alternatives the example shows side by side: each is loaded on its own.
    exclusive = {"redis_url", "redis_cluster"}
    for chosen in exclusive:
        left_out = skip | (exclusive - {chosen})
        load(None, {}, {k: v for k, v in values.items() if k not in left_out})


POSTGRES = "postgresql://chat@db/chat"
REDIS = "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"workers": 2}, "set redis_url or redis_cluster"),
        ({"workers": 2, "database_url": POSTGRES}, "set redis_url or redis_cluster"),
        ({"workers": 2, "redis_url": REDIS}, "SQLite belongs to one process"),
        ({"workers": 0, "redis_url": REDIS, "database_url": POSTGRES}, "workers = 0"),
        ({"workers": 1025, "redis_url": REDIS, "database_url": POSTGRES}, "workers = 1025"),
    ],
    ids=["no broker", "postgres, no broker", "sqlite", "zero", "too many"],
)
def test_workers_need_a_broker_and_postgres(settings, named):
    with pytest.raises(ConfigError, match=named):
        Config(**settings)


def test_several_workers_with_a_broker_and_postgres_are_fine():
    assert Config(workers=4, redis_url=REDIS, database_url=POSTGRES).workers == 4
    cluster = ("redis://127.0.0.1:7000",)
    assert Config(workers=2, redis_cluster=cluster, database_url=POSTGRES).workers == 2
    assert Config().workers == 1


def test_workers_auto_is_the_cpus_in_this_process_affinity_mask(monkeypatch, tmp_path):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    broker = {"redis_url": REDIS, "database_url": POSTGRES}
    assert load(None, {}, {**broker, "workers": "auto"}).workers == 3
    env = {"CHATSERVER_WORKERS": " Auto ", "CHATSERVER_REDIS_URL": REDIS}
    assert load(None, env, {"database_url": POSTGRES}).workers == 3
    f = tmp_path / "c.toml"
    f.write_text(f'workers = "auto"\nredis_url = "{REDIS}"\ndatabase_url = "{POSTGRES}"\n')
    assert load(str(f), {}, {}).workers == 3
    with pytest.raises(ConfigError, match="workers"):
        load(None, {"CHATSERVER_WORKERS": "many"}, broker)


def test_workers_auto_on_one_cpu_needs_no_broker(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert load(None, {"CHATSERVER_WORKERS": "auto"}, {}).workers == 1


def test_readme_names_every_setting():
    from pathlib import Path

    from chatserver.config import SETTINGS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [name for name in SETTINGS if f"`{name}`" not in readme]
    assert missing == []


def test_admin_names_the_database_without_its_password():
    from chatserver.admin import _without_password

    assert _without_password("postgresql://chat:s3cret@db:5432/chat") == (
        "postgresql://chat:***@db:5432/chat"
    )
    assert _without_password("sqlite:///chatserver.sqlite3") == "sqlite:///chatserver.sqlite3"
