"""Tenant scoping for the operator back office, shared by every ModelAdmin.

A superuser sees every tenant. Any other staff user is an operator and sees exactly the
tenant of their OperatorMembership; without a membership they see nothing (fail closed).
Lists, change/delete/history pages, search, autocomplete, filters, inlines, actions and
CSV exports all start from the scoped get_queryset, so one filter guards them all.
"""

import csv
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice

from asgiref.sync import sync_to_async
from django import forms, urls
from django.contrib import admin, messages
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.core.handlers.asgi import ASGIRequest
from django.db import models
from django.http import Http404, HttpResponseRedirect, StreamingHttpResponse
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import content_disposition_header

from agents.admin_forms import CheckedAutocompleteSelect, StrictJSONDecoder
from agents.models import OperatorMembership, Tenant

# The groups the 0005 data migration creates; user administration assigns them.
OPERATOR_READ_ONLY = "Operator (read-only)"
OPERATOR_EDITOR = "Operator (editor)"

NOT_FOUND = "No {name} with this ID exists in your tenant."
NO_TENANT = "tenant: operators create objects in their own tenant; you have none."

# A leading = + - @ (or tab/CR) makes spreadsheets evaluate a cell as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def is_unscoped(user) -> bool:
    return user.is_active and user.is_superuser


def operator_tenant(user) -> Tenant | None:
    """The tenant an operator works in, or None for staff without a membership."""
    try:
        return user.operator_membership.tenant
    except (AttributeError, OperatorMembership.DoesNotExist):
        return None


def tenant_path_for(model) -> str:
    """The lookup from `model` to its Tenant; raises ImproperlyConfigured for a model
    that is not tenant-owned, so a new relation cannot go unscoped by accident."""
    if model is Tenant:
        return "pk"
    field = next((f for f in model._meta.concrete_fields if f.name == "tenant"), None)
    if field is not None and field.related_model is Tenant:
        return "tenant"
    raise ImproperlyConfigured(
        f"{model._meta.label} has no `tenant` foreign key: scope it explicitly, or keep "
        "it out of operator forms."
    )


def scope_queryset(queryset, user, path: str | None = None):
    """`queryset` narrowed to what `user` may see (see the module docstring)."""
    if is_unscoped(user):
        return queryset
    tenant = operator_tenant(user)
    if tenant is None:
        return queryset.none()
    return queryset.filter(**{path or tenant_path_for(queryset.model): tenant.pk})


class ServiceRejected(Exception):
    """A service refused a write the form had accepted; carries its ValidationError."""

    def __init__(self, error: ValidationError):
        super().__init__(error)
        self.error = error


@contextmanager
def service_errors_as_form_errors():
    """Around a service call in save_model/save_formset/delete_model: a ValidationError
    rolls the admin's transaction back and is shown to the operator (see
    TenantScopedAdminMixin.changeform_view)."""
    try:
        yield
    except ValidationError as e:
        raise ServiceRejected(e) from e


def _error_items(error: ValidationError) -> Iterable[tuple[str | None, list[str]]]:
    if hasattr(error, "error_dict"):
        return error.message_dict.items()
    return [(None, error.messages)]


def _with_service_errors(form_class, error: ValidationError):
    class ServiceCheckedForm(form_class):
        def _post_clean(self):
            super()._post_clean()
            for field, field_messages in _error_items(error):
                self.add_error(field if field in self.fields else None, field_messages)

    ServiceCheckedForm.__name__ = form_class.__name__
    return ServiceCheckedForm


def _csv_cell(value):
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


class _Echo:
    def write(self, value):
        return value


# Rows per hop to the database thread when an export is streamed under ASGI.
_CSV_BATCH = 500


def _next_lines(lines: Iterator[str], size: int) -> str:
    return "".join(islice(lines, size))


def _async_lines(lines: Iterator[str]):
    """`lines` as an async iterator. Under ASGI, Django serves a synchronous iterator
    only by reading it whole into memory first (and logs "StreamingHttpResponse must
    consume synchronous iterators"); here each batch is read in the thread that holds
    the request's database connection (thread_sensitive), so the export stays streamed
    and the queryset's cursor stays on its own connection."""

    async def batches():
        read = sync_to_async(_next_lines, thread_sensitive=True)
        while chunk := await read(lines, _CSV_BATCH):
            yield chunk

    return batches()


def csv_response(request, filename: str, header: list[str], rows: Iterable[Iterable]):
    """A streamed CSV download; rows are produced while the response is sent, through an
    async iterator when the request came in over ASGI (runserver, daphne) and a plain one
    under WSGI, as Django's StreamingHttpResponse requires of each."""
    writer = csv.writer(_Echo())

    def lines():
        yield writer.writerow(header)
        for row in rows:
            yield writer.writerow([_csv_cell(v) for v in row])

    content = _async_lines(lines()) if isinstance(request, ASGIRequest) else lines()
    response = StreamingHttpResponse(content, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = content_disposition_header(True, filename)
    response["Cache-Control"] = "no-store"
    return response


class ReadableJSONField(forms.JSONField):
    """A JSON form field that shows an empty value as an empty box, not `null`, and an
    object indented, one key a line. Parsing is forms.JSONField's: an empty box is None,
    as the `null` it used to show was, so saving an untouched empty field changes
    nothing (has_changed compares the parsed values)."""

    def prepare_value(self, value):
        if value is None:
            return ""
        if isinstance(value, forms.fields.InvalidJSONInput):
            return value
        return json.dumps(value, ensure_ascii=False, indent=2, cls=self.encoder)


def json_display(value):
    """A JSON value for a read-only admin field: empty (None) as the admin's dash,
    anything else indented in a <pre> (escaped by format_html). Django's own read-only
    display prints it as one line of JSON."""
    if value is None:
        return "—"
    return format_html(
        '<pre class="json-value">{}</pre>', json.dumps(value, ensure_ascii=False, indent=2)
    )


def json_field_display(field: str, description: str):
    """A read-only display method for the JSON model field `field` (see json_display),
    to name in an admin's json_displays."""

    @admin.display(description=description)
    def display(modeladmin, obj):
        return json_display(getattr(obj, field))

    return display


def main_fieldset(*fields: str) -> tuple:
    """The first, untitled section of a tenant-owned object's change form: its id and
    tenant (dropped for operators, see TenantScopedAdminMixin), then `fields`."""
    return (None, {"fields": ["id", "tenant", *fields]})


def status_action(description: str, status: str, verb: str):
    """An admin action (permission: change) moving the selected rows to `status`
    through the admin's `_set_status(request, queryset, status, verb)`."""

    @admin.action(description=description, permissions=["change"])
    def action(modeladmin, request, queryset):
        modeladmin._set_status(request, queryset, status, verb)

    return action


def adopt_created(obj, created: models.Model) -> None:
    """Make the admin's unsaved `obj` the row a service created, as the redirect, the
    log entry and the inline formsets that follow save_model need it."""
    for field in created._meta.concrete_fields:
        setattr(obj, field.attname, getattr(created, field.attname))
    obj._state.adding = False


def _owner_id(obj, path: str):
    *hops, last = path.split("__")
    for hop in hops:
        obj = getattr(obj, hop)
    return obj.pk if last == "pk" else getattr(obj, obj._meta.get_field(last).attname)


def _without_tenant(fields):
    kept = []
    for entry in fields:
        if isinstance(entry, list | tuple):
            entry = type(entry)(f for f in entry if f != "tenant")
            if entry:
                kept.append(entry)
        elif entry != "tenant":
            kept.append(entry)
    return kept


class TenantScopedInlineMixin:
    """Mix in before an InlineModelAdmin. Its permission methods receive the parent
    object, which the parent admin has already scoped; the rows themselves are scoped
    by `tenant_path` (the lookup from the inline's model to its Tenant)."""

    tenant_path = "tenant"
    formfield_overrides = {
        models.JSONField: {
            "decoder": StrictJSONDecoder,
            "form_class": ReadableJSONField,
            "widget": forms.Textarea(attrs={"rows": 6, "cols": 60, "class": "json-input"}),
        }
    }

    def get_queryset(self, request):
        return scope_queryset(super().get_queryset(request), request.user, self.tenant_path)

    def has_tenant_scope(self, request) -> bool:
        return is_unscoped(request.user) or operator_tenant(request.user) is not None

    def has_view_permission(self, request, obj=None):
        return self.has_tenant_scope(request) and super().has_view_permission(request, obj)

    # *args: ModelAdmin's takes (request), InlineModelAdmin's (request, parent).
    def has_add_permission(self, request, *args):
        return self.has_tenant_scope(request) and super().has_add_permission(request, *args)

    def has_change_permission(self, request, obj=None):
        return self.has_tenant_scope(request) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return self.has_tenant_scope(request) and super().has_delete_permission(request, obj)

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if "widget" not in kwargs and db_field.name in self.get_autocomplete_fields(request):
            kwargs["widget"] = CheckedAutocompleteSelect(
                db_field, self.admin_site, using=kwargs.get("using")
            )
        formfield = super().formfield_for_foreignkey(db_field, request, **kwargs)
        if formfield is not None and not is_unscoped(request.user):
            formfield.queryset = scope_queryset(formfield.queryset, request.user)
        return formfield


class TenantScopedAdminMixin(TenantScopedInlineMixin):
    """Mix in before admin.ModelAdmin.

    Operators never see or pick a tenant: "tenant" is dropped from their fieldsets, list
    columns and filters, and new objects get the tenant of their membership
    (tenant_for_new).
    """

    # Scope -------------------------------------------------------------------------

    def object_in_scope(self, request, obj) -> bool:
        if obj is None or is_unscoped(request.user):
            return self.has_tenant_scope(request)
        tenant = operator_tenant(request.user)
        return tenant is not None and _owner_id(obj, self.tenant_path) == tenant.pk

    def get_object(self, request, object_id, from_field=None):
        obj = super().get_object(request, object_id, from_field)
        # Another tenant's object is indistinguishable from one that does not exist:
        # a 404, where Django's admin would redirect with a message naming the ID.
        if obj is None:
            raise Http404(NOT_FOUND.format(name=self.opts.verbose_name))
        return obj

    def has_module_permission(self, request):
        return self.has_tenant_scope(request) and super().has_module_permission(request)

    def has_view_permission(self, request, obj=None):
        return self.object_in_scope(request, obj) and super().has_view_permission(request, obj)

    def has_change_permission(self, request, obj=None):
        return self.object_in_scope(request, obj) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return self.object_in_scope(request, obj) and super().has_delete_permission(request, obj)

    def tenant_for_new(self, request, form) -> Tenant:
        """The tenant a new object goes to: the form's choice for a superuser, the
        membership's for an operator."""
        if is_unscoped(request.user):
            return form.cleaned_data["tenant"]
        tenant = operator_tenant(request.user)
        if tenant is None:
            raise ServiceRejected(ValidationError({"tenant": NO_TENANT}))
        return tenant

    # What operators see --------------------------------------------------------------

    # JSON model fields shown through a display method (json_display) wherever they are
    # read-only: {field name: method name}. The admin lists the method names among its
    # read-only fields; get_fieldsets puts them in place of the fields.
    json_displays: dict[str, str] = {}

    def _json_shown_read_only(self, request, obj) -> set[str]:
        if obj is None or not self.json_displays:
            return set()
        if not self.has_change_permission(request, obj):
            return set(self.json_displays)
        return set(self.json_displays) & set(self.get_readonly_fields(request, obj))

    def get_fieldsets(self, request, obj=None):
        fieldsets = self._scoped_fieldsets(request, obj)
        shown = self._json_shown_read_only(request, obj)
        if not shown:
            return fieldsets
        return [
            (
                name,
                {
                    **options,
                    "fields": [
                        self.json_displays.get(f, f) if f in shown else f for f in options["fields"]
                    ],
                },
            )
            for name, options in fieldsets
        ]

    def _scoped_fieldsets(self, request, obj=None):
        # add_fieldsets, as auth's UserAdmin has: the add form shows what creation takes.
        add_fieldsets = getattr(self, "add_fieldsets", None)
        if obj is None and add_fieldsets:
            fieldsets = add_fieldsets
        else:
            fieldsets = super().get_fieldsets(request, obj)
        if is_unscoped(request.user):
            return fieldsets
        return [
            (name, {**options, "fields": _without_tenant(options["fields"])})
            for name, options in fieldsets
        ]

    def get_list_display(self, request):
        columns = super().get_list_display(request)
        if is_unscoped(request.user):
            return columns
        return [c for c in columns if c != "tenant"]

    def get_list_filter(self, request):
        filters = super().get_list_filter(request)
        if is_unscoped(request.user):
            return filters
        # RelatedFieldListFilter would list every tenant's name.
        return [f for f in filters if f != "tenant"]

    # Pages -------------------------------------------------------------------------

    # Pages of one object besides the change page: {path segment: view method name}.
    # Each is served at <object_id>/<segment>/ and named "<app>_<model>_<segment>".
    object_views: dict[str, str] = {}

    def get_urls(self):
        # Before the default patterns: their "<path:object_id>/" would swallow these.
        prefix = f"{self.opts.app_label}_{self.opts.model_name}"
        return [
            urls.path(
                f"<path:object_id>/{segment}/",
                self.admin_site.admin_view(getattr(self, view)),
                name=f"{prefix}_{segment}",
            )
            for segment, view in self.object_views.items()
        ] + super().get_urls()

    # Service errors ------------------------------------------------------------------

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change, **kwargs)
        rejected = getattr(request, "_admin_service_error", None)
        return form if rejected is None else _with_service_errors(form, rejected)

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except ServiceRejected as rejected:
            # The failed pass rolled back as a whole; a second pass over the same POST
            # renders the form with the service's messages as its errors, writing nothing.
            request._admin_service_error = rejected.error
            return super().changeform_view(request, object_id, form_url, extra_context)

    def delete_view(self, request, object_id, extra_context=None):
        try:
            return super().delete_view(request, object_id, extra_context)
        except ServiceRejected as rejected:
            self.report_service_error(request, rejected.error)
            info = (self.opts.app_label, self.opts.model_name)
            return HttpResponseRedirect(reverse("admin:{}_{}_changelist".format(*info)))

    def report_service_error(self, request, error: ValidationError) -> None:
        """Show a service's refusal from an admin action as error messages."""
        for _, field_messages in _error_items(error):
            for message in field_messages:
                self.message_user(request, message, messages.ERROR)
