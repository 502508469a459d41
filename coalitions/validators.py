from django.core.exceptions import ValidationError

from agents.validators import brief
from coalitions.models import BusinessModel

BUSINESS_MODEL_UNKNOWN = "business_model: {value!r} is not one of {allowed}."


def validate_business_model(value) -> str:
    if not isinstance(value, str) or value not in BusinessModel.values:
        raise ValidationError(
            {
                "business_model": BUSINESS_MODEL_UNKNOWN.format(
                    value=brief(value), allowed=", ".join(BusinessModel.values)
                )
            }
        )
    return value
