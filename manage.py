#!/usr/bin/env python
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "freeagentics.settings")
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        # Loads the settings module now, so a missing or bad variable is reported here in
        # one line; Django would otherwise show a traceback through its command machinery.
        settings.INSTALLED_APPS  # noqa: B018
    except ImproperlyConfigured as e:
        print(
            f"manage.py: {e} Set the variables .env.example lists (production), or DEBUG=1 "
            "with DATABASE_URL and REDIS_URL for development; `bash scripts/run.sh` "
            "(README command 1) starts a development stack and prints them.",
            file=sys.stderr,
        )
        sys.exit(1)
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
