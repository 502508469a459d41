"""One line, never a traceback, for what an operator meets running the backup commands;
and what restore and verify_backup, which both read a backup back, share."""

import contextlib

from django.core.management.base import CommandError

from backups import pgtools
from backups.exceptions import ACCEPT_UNSIGNED_HELP, INTERRUPTED
from backups.management.base import service_errors

# What operator_errors reports after Ctrl-C in restore and verify_backup: both restore
# into a scratch database first, which the service removed.
SCRATCH_REMOVED = "its scratch database and staging files were removed"


def add_accept_unsigned_argument(parser) -> None:
    parser.add_argument("--accept-unsigned-backup", action="store_true", help=ACCEPT_UNSIGNED_HELP)


@contextlib.contextmanager
def operator_errors(what: str):
    """service_errors(), plus Ctrl-C (exit status 130, after the service cleaned up), file
    system errors (an unusable BACKUP_DIR or BACKUP_TEMP_DIR) and database errors."""
    try:
        with service_errors():
            yield
    except KeyboardInterrupt:
        raise CommandError(INTERRUPTED.format(what=what), returncode=130) from None
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise CommandError(
            f"{e.strerror or e}{where}. Check BACKUP_DIR (or the backup storage settings) "
            "and BACKUP_TEMP_DIR."
        ) from e
    except pgtools.DB_ERROR as e:
        raise CommandError(f"Database error: {str(e).strip().splitlines()[0]}") from e
