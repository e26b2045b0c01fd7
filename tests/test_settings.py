"""Settings from the environment: the ORDERSTREAM_* names and their defaults, a bad value
refused naming the variable and what it expects, and `orderstream serve` saying so in one
line. Tests hand in their own environment; the process's own is never read."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orderstream.infrastructure.errors import SettingsError
from orderstream.infrastructure.security.auth import TokenSettings
from orderstream.infrastructure.settings import Settings
from orderstream.infrastructure.web.limits import QueryLimits


def test_without_variables_every_setting_has_its_default(tmp_path):
    settings = Settings.load(str(tmp_path), environ={})
    assert settings == Settings(
        data_dir=tmp_path, event_store_url=f"sqlite+aiosqlite:///{tmp_path / 'events.db'}",
        read_store_url=f"sqlite+aiosqlite:///{tmp_path / 'read.db'}", tokens=TokenSettings(),
        consistency_timeout=5.0, environment="development", query_limits=QueryLimits(), max_body_bytes=1024 * 1024,
        cors_origins=(), websocket_origins=(), rate_limit=50.0, rate_burst=200, rate_limit_storage="memory://",
        rate_limit_prefix="orderstream")


def test_the_variables_set_what_they_name(tmp_path):
    settings = Settings.load(None, environ={
        "ORDERSTREAM_DATA_DIR": str(tmp_path / "data"), "ORDERSTREAM_CONSISTENCY_TIMEOUT": "2.5",
        "ORDERSTREAM_EVENT_STORE_URL": "postgresql+asyncpg://db/events", "ORDERSTREAM_MAX_QUERY_ALIASES": "0",
        "ORDERSTREAM_MAX_BODY_BYTES": "4096", "ORDERSTREAM_RATE_LIMIT": "0.5", "ORDERSTREAM_RATE_BURST": "3",
        "ORDERSTREAM_RATE_LIMIT_STORAGE": "redis://cache.internal:6379/2", "ORDERSTREAM_RATE_LIMIT_PREFIX": "shop-eu",
        "ORDERSTREAM_JWT_LEEWAY": "0", "ORDERSTREAM_JWT_ISSUER": "https://id.example.com",
        "ORDERSTREAM_ENV": "production", "ORDERSTREAM_INTROSPECTION": " On ",
    })
    assert settings.data_dir == tmp_path / "data"
    assert settings.read_store_url == f"sqlite+aiosqlite:///{tmp_path / 'data' / 'read.db'}"
    assert (settings.event_store_url, settings.consistency_timeout) == ("postgresql+asyncpg://db/events", 2.5)
    assert (settings.max_body_bytes, settings.rate_limit, settings.rate_burst) == (4096, 0.5, 3)
    assert (settings.rate_limit_storage, settings.rate_limit_prefix) == ("redis://cache.internal:6379/2", "shop-eu")
    assert (settings.tokens.leeway, settings.tokens.issuer) == (0, "https://id.example.com")
    assert settings.query_limits == QueryLimits(max_aliases=0, introspection=True, suggestions=False)


def test_the_data_dir_given_on_the_command_line_wins(tmp_path):
    settings = Settings.load(str(tmp_path / "given"), environ={"ORDERSTREAM_DATA_DIR": str(tmp_path / "env")})
    assert settings.data_dir == tmp_path / "given"


def test_only_the_environment_handed_in_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("ORDERSTREAM_RATE_LIMIT", "7")
    assert Settings.load(str(tmp_path), environ={}).rate_limit == 50.0
    assert Settings.load(str(tmp_path)).rate_limit == 7.0  # os.environ, when none is handed in


def test_an_empty_variable_is_unset_but_empty_origins_are_none(tmp_path):
    settings = Settings.load(str(tmp_path), environ={
        "ORDERSTREAM_RATE_BURST": "", "ORDERSTREAM_CORS_ORIGINS": "https://shop.example.com",
        "ORDERSTREAM_WS_ORIGINS": ""})
    assert settings.rate_burst == 200
    assert (settings.cors_origins, settings.websocket_origins) == (("https://shop.example.com",), ())


@pytest.mark.parametrize(("name", "value", "message"), [
    ("ORDERSTREAM_CONSISTENCY_TIMEOUT", "abc",
     "ORDERSTREAM_CONSISTENCY_TIMEOUT: expected a number of seconds, e.g. 5, got 'abc'"),
    ("ORDERSTREAM_CONSISTENCY_TIMEOUT", "-1", "ORDERSTREAM_CONSISTENCY_TIMEOUT: expected a number of seconds"),
    ("ORDERSTREAM_MAX_QUERY_TOKENS", "1e3", "ORDERSTREAM_MAX_QUERY_TOKENS: expected a whole number, at least 1, "
                                            "got '1e3'"),
    ("ORDERSTREAM_RATE_BURST", "0", "ORDERSTREAM_RATE_BURST: expected a whole number of requests, at least 1, got '0'"),
    ("ORDERSTREAM_RATE_LIMIT", "inf", "ORDERSTREAM_RATE_LIMIT: expected requests a second"),
    ("ORDERSTREAM_RATE_LIMIT_STORAGE", "memcached://localhost:11211",
     "ORDERSTREAM_RATE_LIMIT_STORAGE: expected memory:// or a Redis URL such as redis://localhost:6379/0, "
     "got 'memcached://localhost:11211'"),
    ("ORDERSTREAM_FIELD_SUGGESTIONS", "sometimes", "ORDERSTREAM_FIELD_SUGGESTIONS: expected on or off, "
                                                   "got 'sometimes'"),
    ("ORDERSTREAM_CORS_ORIGINS", "https://shop.example.com, shop.example.com",
     "ORDERSTREAM_CORS_ORIGINS: expected origins such as https://shop.example.com, comma-separated, got "),
    ("ORDERSTREAM_JWT_ALGORITHMS", "HS512", "ORDERSTREAM_JWT_ALGORITHMS must be HS256, or RS256 and/or ES256"),
])
def test_a_bad_value_is_refused_naming_the_variable_and_what_it_expects(tmp_path, name, value, message):
    with pytest.raises(SettingsError) as refused:
        Settings.load(str(tmp_path), environ={name: value})
    assert str(refused.value).startswith(message), str(refused.value)


def test_serve_with_a_bad_setting_stops_with_one_line(tmp_path):
    environ = {**os.environ, "ORDERSTREAM_CONSISTENCY_TIMEOUT": "abc"}
    done = subprocess.run([sys.executable, "-m", "orderstream", "serve", "--data-dir", str(tmp_path)],
                          env=environ, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert done.returncode == 1
    assert done.stderr == ("orderstream serve: ORDERSTREAM_CONSISTENCY_TIMEOUT: expected a number of seconds, e.g. 5, "
                           "got 'abc'\n")


def test_serve_with_an_unreadable_key_file_stops_with_one_line(tmp_path):
    environ = {**os.environ, "ORDERSTREAM_JWT_ALGORITHMS": "RS256",
               "ORDERSTREAM_JWT_PUBLIC_KEY_FILE": str(tmp_path / "nowhere.pem")}
    environ.pop("ORDERSTREAM_JWT_SECRET", None)
    done = subprocess.run([sys.executable, "-m", "orderstream", "serve", "--data-dir", str(tmp_path)],
                          env=environ, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()[-1:]
    assert line.startswith("orderstream serve: ORDERSTREAM_JWT_PUBLIC_KEY_FILE: cannot read"), done.stderr
    assert "Traceback" not in done.stderr
