import functools
import operator

import numpy as np
from django.core.exceptions import FieldError
from django.db import models

from agents.encryption import decrypt_array, encrypt_array


class Sealed(bytes):
    """A token encrypt_array made, on its way to the database."""


class EncryptedArrayField(models.BinaryField):
    """A numpy array stored encrypted in BYTEA (see agents.encryption for the format).

    The array is encrypted when its model instance is saved, with the data key of the
    tenant `tenant_attribute` names on the instance ("tenant_id", or "agent.tenant_id").
    A bare array outside a save (`QuerySet.update(belief_state=...)`) has no tenant and
    is refused.

    Only `isnull` can be queried: equality or ordering on ciphertext would silently
    match nothing, so every other lookup is refused.
    """

    description = "An encrypted numpy array"

    def __init__(self, *args, tenant_attribute: str = "tenant_id", **kwargs):
        self.tenant_of = operator.attrgetter(tenant_attribute)
        super().__init__(*args, **kwargs)

    @property
    def label(self) -> str:
        return f"{self.model._meta.label}.{self.name}"

    @functools.cached_property
    def _label(self) -> str:
        return self.label

    def pre_save(self, model_instance, add):
        value = getattr(model_instance, self.attname)
        if isinstance(value, np.ndarray):
            return Sealed(encrypt_array(value, tenant_id=self.tenant_of(model_instance)))
        return value

    def from_db_value(self, value, expression, connection):
        if value is None:
            return None
        return decrypt_array(value if isinstance(value, bytes) else bytes(value), label=self._label)

    def to_python(self, value):
        return value

    def get_db_prep_value(self, value, connection, prepared=False):
        if value is None or isinstance(value, Sealed):
            return value
        if isinstance(value, np.ndarray):
            raise TypeError(
                f"{self.label} is encrypted with its tenant's key when its instance is saved; "
                "an array outside save() has no tenant (use the agents services)."
            )
        raise TypeError(f"{self.label} takes a numpy.ndarray, got {type(value).__name__}.")

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
