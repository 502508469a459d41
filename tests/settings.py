"""Test settings: the real settings, pointed at test services; still real PostgreSQL and Redis."""

import os

os.environ.setdefault("SECRET_KEY", "test-secret-key")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/freeagentics")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
# Fixed test keys, so failures reproduce; never used outside tests.
os.environ.setdefault(
    "FREEAGENTICS_ENCRYPTION_KEYS",
    "j0BikImprDHDLmqRY3Lwqh54e7y_J3kuTUJqAnpvd1M=",
)
os.environ.setdefault("CACHE_KEY_PREFIX", "test")
os.environ.setdefault("CHANNEL_PREFIX", "test-asgi")
# Tests speak plain HTTP to loopback servers; production's HTTPS settings are tested
# on their own in tests/test_settings.py.
os.environ.setdefault("SECURE_SSL_REDIRECT", "0")
os.environ.setdefault("SESSION_COOKIE_SECURE", "0")
os.environ.setdefault("CSRF_COOKIE_SECURE", "0")

from freeagentics.settings import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
