import stat
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def test_ensure_admin_creates_superuser_once_and_shows_password_once(tmp_path):
    password_file = tmp_path / "var" / "admin-password.txt"
    out = StringIO()
    call_command("ensure_admin", "--password-file", str(password_file), stdout=out)

    user = get_user_model().objects.get(username="admin")
    assert user.is_superuser and user.is_staff
    password = out.getvalue().split("with password: ")[1].split()[0]
    assert user.check_password(password)
    assert password_file.read_text() == f"username: admin\npassword: {password}\n"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600

    out = StringIO()
    call_command("ensure_admin", "--password-file", str(password_file), stdout=out)
    assert "exists" in out.getvalue()
    assert password not in out.getvalue()
    assert get_user_model().objects.filter(username="admin").count() == 1


def test_ensure_admin_tightens_an_existing_password_file(tmp_path):
    password_file = tmp_path / "admin-password.txt"
    password_file.write_text("old")
    password_file.chmod(0o644)

    call_command("ensure_admin", "--password-file", str(password_file), stdout=StringIO())

    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert password_file.read_text().startswith("username: admin\n")
