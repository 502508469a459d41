"""The development superuser that `bash scripts/run.sh` creates (the demo tenant's data
is coalitions.demo)."""

import secrets

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction


def demo_admin_ensure(*, username: str = "admin") -> str | None:
    """Create superuser `username` with a random password unless it exists.

    Returns the new password, or None when the user already existed (its password is
    never shown again; `manage.py changepassword` resets it).
    """
    User = get_user_model()
    if User._default_manager.filter(**{User.USERNAME_FIELD: username}).exists():
        return None
    password = secrets.token_urlsafe(18)
    try:
        with transaction.atomic():
            User._default_manager.create_superuser(
                **{User.USERNAME_FIELD: username}, email="", password=password
            )
    except IntegrityError:
        # Another process created it between the check and the insert.
        return None
    return password
