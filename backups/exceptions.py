"""Errors of the backups app, and the messages of the rules it enforces.

Broken rules raise django.core.exceptions.ValidationError with one of the message
constants below (tests import them). Failures of the work itself (a tool missing, a
corrupt archive, a failed drill) raise a BackupError subclass.
"""

# Rules (ValidationError).
TARGET_NOT_EMPTY = (
    "{target} is not empty; restoring replaces everything in it. Pass --yes to overwrite."
)
REDIS_NOT_EMPTY = (
    "Redis database {target} holds {keys} keys; restoring flushes it. Pass --yes to overwrite."
)
TARGET_IN_USE = (
    "{count} other session(s) are connected to database {database} ({who}). Stop them, "
    "or pass --disconnect to end them."
)
BACKUP_NAME_INVALID = "{name!r} is not a backup name (letters, digits, '.', '_', '-')."
RETENTION_INVALID = "--keep must be at least 1 and --max-age must be positive."
MAX_AGE_INVALID = "{value!r} is not an age: use a number of days or 12h, 30d, 8w."
RETENTION_NEEDS_YES = (
    "--keep/--max-age delete old backups: pass --yes (or --dry-run to see what would go)."
)
PARTITION_LOCK_HELD = "Another partition maintenance run holds the lock; this run changed nothing."
PARTITION_DROP_NEEDS_YES = "The plan drops {tables}; pass --yes to go ahead (or --dry-run)."
PARTITION_SETTINGS_INVALID = "premake must be >= 0 and retention must be >= 0 months."
PARTITION_TABLE_EXISTS = (
    "Table {table} already exists. Drop it, or keep it by renaming it and its indexes "
    "(their names would clash too), in `manage.py dbshell`:\n{sql}\nthen restore again."
)
PARTITION_MONTH_ATTACHED = (
    "{parent} already has a partition for {month}: {existing}. Restore without --attach, "
    "then copy the rows over in `manage.py dbshell`:\n{sql}"
)
PARTITION_TABLE_BUSY = (
    "{table} stayed locked by other transactions through {tries} tries; this step changed "
    "nothing. Look for long transactions (pg_stat_activity) and run maintenance again."
)
NOTHING_TO_BACK_UP = "Nothing to back up: --no-postgres and --no-redis leave nothing."
NOTHING_TO_RESTORE = "Nothing to restore: the backup holds no {what}."
# Authentication of manifests (BackupIntegrityError).
ACCEPT_UNSIGNED_HELP = (
    "Also accept a backup whose manifest is not signed by BACKUP_ENCRYPTION_KEY. Its origin "
    "is unproven: anyone who can write to the backup storage could have planted it."
)
MANIFEST_UNSIGNED = (
    "{name}: the manifest is not signed by BACKUP_ENCRYPTION_KEY, so anyone able to write to "
    "the backup storage could have made it. Refused; pass --accept-unsigned-backup only if "
    "you know where it came from."
)
MANIFEST_FORGED = (
    "{name}: the manifest signature does not match BACKUP_ENCRYPTION_KEY; it was altered, "
    "forged, or written with another key. Refused."
)
INTERRUPTED = "Interrupted; {what}."


class BackupError(Exception):
    """A backup, restore or drill could not be done; the message says why."""


class BackupNotFound(BackupError):
    """No backup of that name in the backup storage."""


class BackupIntegrityError(BackupError):
    """A manifest or file is missing, truncated, corrupt, or signed by another key."""


class UnsignedBackupError(BackupIntegrityError):
    """A backup key is set and the manifest is not signed with it."""


class ToolNotFoundError(BackupError):
    """No usable pg_dump, pg_restore or redis-cli."""


class ToolFailedError(BackupError):
    """pg_dump, pg_restore or redis-cli exited with an error."""


class DrillFailedError(BackupError):
    """A restored copy failed a check; .report holds what was checked."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report
