from django.core.exceptions import ValidationError

from coalitions.models import BusinessModel

BUSINESS_MODEL_UNKNOWN = "business_model: {value!r} is not one of {allowed}."


def validate_business_model(value) -> str:
    if value not in BusinessModel.values:
        raise ValidationError(
            {
                "business_model": BUSINESS_MODEL_UNKNOWN.format(
                    value=value, allowed=", ".join(BusinessModel.values)
                )
            }
        )
    return value
