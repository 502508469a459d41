import os
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from agents.demo import demo_admin_ensure


class Command(BaseCommand):
    help = (
        "Create a superuser with a random password unless it exists, and show the password "
        "once. Meant for development stacks (scripts/run.sh)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin", help="Superuser to ensure.")
        parser.add_argument(
            "--password-file",
            type=Path,
            help="Also write a newly created password here, readable by the owner only.",
        )

    def handle(self, *args, **options):
        username = options["username"]
        if not username:
            raise CommandError("--username must not be empty.")
        password_file = options["password_file"]
        password = demo_admin_ensure(username=username)
        if password is None:
            where = (
                f"; the password it was created with is in {password_file}"
                if password_file and password_file.exists()
                else ""
            )
            self.stdout.write(
                f"Superuser {username!r} exists{where}. "
                f"Reset the password with: manage.py changepassword {username}"
            )
            return
        self.stdout.write(
            self.style.SUCCESS(f"Created superuser {username!r} with password: {password}")
        )
        if password_file:
            try:
                # Labelled, so nobody takes the whole file for the password.
                _write_private(password_file, password_file_text(username, password))
            except OSError as e:
                raise CommandError(f"Could not write {password_file}: {e}") from e
            self.stdout.write(f"The password is also in {password_file} (mode 0600).")


def password_file_text(username: str, password: str) -> str:
    return f"username: {username}\npassword: {password}\n"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 from the start, so the password is never briefly world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        # An existing file keeps its old mode through O_CREAT; tighten it too.
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
