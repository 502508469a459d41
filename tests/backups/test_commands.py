import pytest
from django.core.management import get_commands, load_command_class

COMMANDS = [
    "backup",
    "listbackups",
    "restore",
    "verify_backup",
    "cleanup_backups",
    "maintain_partitions",
    "restore_partition",
]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name):
    assert get_commands()[name] == "backups"
    command = load_command_class("backups", name)
    text = command.create_parser("manage.py", name).format_help()
    assert command.help.split()[0] in text
    assert len(command.help) > 40


def test_destructive_commands_offer_dry_run_and_yes():
    for name in ("restore", "maintain_partitions", "backup"):
        command = load_command_class("backups", name)
        text = command.create_parser("manage.py", name).format_help()
        assert "--dry-run" in text and "--yes" in text
