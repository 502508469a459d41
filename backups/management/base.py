"""What the backups commands share: turning service errors into one-line CommandErrors."""

import contextlib

from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.core.management.base import CommandError

from backups.exceptions import BackupError
from freeagentics.progress import Progress


@contextlib.contextmanager
def service_errors():
    try:
        yield
    except ValidationError as e:
        raise CommandError("; ".join(e.messages)) from e
    except (BackupError, ImproperlyConfigured) as e:
        raise CommandError(str(e)) from e


def progress_for(command, options) -> Progress:
    return Progress(command.stdout, verbosity=options["verbosity"])
