import functools

import numpy as np
from django.core.exceptions import FieldError
from django.db import models

from agents.encryption import decrypt_array, encrypt_array


class EncryptedArrayField(models.BinaryField):
    """A numpy array stored encrypted in BYTEA (see agents.encryption for the format).

    Only `isnull` can be queried: equality or ordering on ciphertext would silently
    match nothing, so every other lookup is refused.
    """

    description = "An encrypted numpy array"

    @property
    def label(self) -> str:
        return f"{self.model._meta.label}.{self.name}"

    @functools.cached_property
    def _label(self) -> str:
        return self.label

    def from_db_value(self, value, expression, connection):
        if value is None:
            return None
        return decrypt_array(value if isinstance(value, bytes) else bytes(value), label=self._label)

    def to_python(self, value):
        return value

    def get_db_prep_value(self, value, connection, prepared=False):
        if value is None:
            return None
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{self.label} takes a numpy.ndarray, got {type(value).__name__}.")
        return encrypt_array(value)

    def get_lookup(self, lookup_name):
        if lookup_name == "isnull":
            return super().get_lookup(lookup_name)
        raise FieldError(
            f"{self.label} is encrypted: only the 'isnull' lookup is supported, "
            f"not {lookup_name!r}."
        )

    def get_transform(self, lookup_name):
        raise FieldError(
            f"{self.label} is encrypted: transforms such as {lookup_name!r} are not supported."
        )

    def value_to_string(self, obj):
        raise FieldError(f"{self.label} is encrypted and cannot be serialised as text.")


class DatabaseNow(models.Func):
    """NOW() as a column default, as ADR-012 writes it (Django's Now() renders
    statement_timestamp())."""

    template = "NOW()"
    output_field = models.DateTimeField()
