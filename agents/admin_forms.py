"""Form pieces the back office shares, so hostile input is a form error, never a 500."""

import json
import math

from django.contrib.admin.widgets import AutocompleteSelect
from django.core.exceptions import ValidationError


def _refuse_constant(name: str):
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise json.JSONDecodeError("number out of range", text, 0)
    return value


class StrictJSONDecoder(json.JSONDecoder):
    """Python's json accepts what PostgreSQL's jsonb cannot store (NaN, Infinity, 1e400,
    unpaired surrogates) and raises RecursionError on deep nesting. Refusing all of them
    as JSONDecodeError makes forms.JSONField show "Enter a valid JSON." and re-render
    the text as typed, where the page itself would otherwise fail to render."""

    def __init__(self, **kwargs):
        super().__init__(parse_constant=_refuse_constant, parse_float=_finite_float, **kwargs)

    def decode(self, s, *args, **kwargs):
        try:
            value = super().decode(s, *args, **kwargs)
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except RecursionError:
            raise json.JSONDecodeError("nested too deeply", s, 0) from None
        except UnicodeEncodeError:
            raise json.JSONDecodeError("unpaired surrogate", s, 0) from None
        return value


class CheckedAutocompleteSelect(AutocompleteSelect):
    """Django's autocomplete widget looks the submitted value up to show it again; a
    value that is not even a key of the target model (not a UUID) made that lookup
    raise while rendering the form's errors. Such a value selects nothing."""

    def optgroups(self, name, value, attr=None):
        target = self.field.target_field
        usable = []
        for item in value:
            try:
                target.get_prep_value(target.to_python(item))
            except (ValidationError, ValueError, TypeError):
                continue
            usable.append(item)
        return super().optgroups(name, usable, attr)
