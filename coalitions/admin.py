"""Back office for coalitions and their members.

Every write goes through coalitions.services: a new coalition through coalition_create,
members through coalition_add_member / coalition_remove_member, status through admin
actions calling coalition_set_status. No service edits an existing coalition's fields or
a member's role and score, so those are read-only here.
"""

from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets, unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count
from django.http import HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import reverse

from agents.admin_scoping import (
    TenantScopedAdminMixin,
    TenantScopedInlineMixin,
    adopt_created,
    csv_response,
    json_field_display,
    main_fieldset,
    service_errors_as_form_errors,
    status_action,
)
from coalitions.models import Coalition, CoalitionMember, CoalitionStatus
from coalitions.selectors import COALITION_EXPORT_HEADER, coalition_export_rows
from coalitions.services import (
    ALLOWED_TRANSITIONS,
    coalition_create,
    coalition_members_sync,
    coalition_set_status,
    coalition_update,
)

# Fields of an existing coalition an operator may edit (through coalition_update).
EDITABLE_FIELDS = (
    "name",
    "business_model",
    "current_capital",
    "total_revenue",
    "formation_criteria",
    "business_config",
)
MEMBER_AGENT_FIXED = "agent: remove the member and add the other agent instead."


class CoalitionMemberInline(TenantScopedInlineMixin, admin.TabularInline):
    model = CoalitionMember
    tenant_path = "coalition__tenant"
    extra = 0
    autocomplete_fields = ["agent"]
    fields = ["agent", "agent_status", "role", "contribution_score", "joined_at"]
    # The tabular template writes a member's hidden id only for a primary key that is an
    # AutoField, not editable, or excluded; without it a saved row matched no existing
    # member ("Please correct the errors below" with no field error).
    exclude = ["id"]
    readonly_fields = ["agent_status", "joined_at"]
    ordering = ["-contribution_score", "joined_at"]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("agent").defer("agent__belief_state")

    def has_change_permission(self, request, obj=None):
        if obj is not None and obj.status == CoalitionStatus.DISSOLVED:
            return False
        return super().has_change_permission(request, obj)

    def has_add_permission(self, request, obj):
        if obj is not None and obj.status == CoalitionStatus.DISSOLVED:
            return False
        return super().has_add_permission(request, obj)

    def get_formset(self, request, obj=None, **kwargs):
        formset = super().get_formset(request, obj, **kwargs)
        agent = formset.form.base_fields.get("agent")
        if obj is not None and agent is not None:
            # Superusers are unscoped, but a coalition only takes its own tenant's agents.
            agent.queryset = agent.queryset.filter(tenant_id=obj.tenant_id)
        return formset

    @admin.display(description="Agent status")
    def agent_status(self, obj):
        return obj.agent.status if obj.agent_id else "—"


@admin.register(Coalition)
class CoalitionAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    list_display = [
        "name",
        "business_model",
        "tenant",
        "status",
        "member_count",
        "current_capital",
        "total_revenue",
        "created_at",
    ]
    list_filter = ["status", "business_model", "tenant"]
    search_fields = ["name", "business_model"]
    list_select_related = ["tenant"]
    inlines = [CoalitionMemberInline]
    actions = ["activate", "mark_profitable", "dissolve", "export_csv"]
    add_fieldsets = [
        (
            None,
            {
                "fields": [
                    "tenant",
                    "name",
                    "business_model",
                    "initial_capital",
                    "formation_criteria",
                    "business_config",
                ]
            },
        )
    ]
    fieldsets = [
        main_fieldset(
            "name", "business_model", "status", "created_at", "updated_at", "dissolved_at"
        ),
        (
            "Capital and revenue",
            {"fields": ["initial_capital", "current_capital", "total_revenue"]},
        ),
        ("Configuration", {"fields": ["formation_criteria", "business_config"]}),
    ]
    json_displays = {
        "formation_criteria": "formation_criteria_view",
        "business_config": "business_config_view",
    }
    object_views = {"status": "status_view"}

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_member_count=Count("memberships"))

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        views = list(self.json_displays.values())
        if obj.status == CoalitionStatus.DISSOLVED:
            return [*flatten_fieldsets(self.fieldsets), *views]
        # Status moves only through its buttons and actions (coalition_set_status).
        fixed = [f for f in flatten_fieldsets(self.fieldsets) if f not in EDITABLE_FIELDS]
        return [*fixed, *views]

    def has_delete_permission(self, request, obj=None):
        # Coalitions are dissolved, not deleted: no service deletes one (and refreshes
        # the membership cache), and a dissolved coalition keeps its history.
        return False

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None and self.has_change_permission(request, obj):
            # Buttons for the moves the status rules allow from here, in their order.
            context["status_moves"] = [
                status
                for status in CoalitionStatus.values
                if status in ALLOWED_TRANSITIONS[CoalitionStatus(obj.status)]
            ]
        return super().render_change_form(request, context, add, change, form_url, obj)

    def status_view(self, request, object_id):
        """The change page's status buttons: one coalition_set_status call."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        coalition = self.get_object(request, unquote(object_id))
        if not self.has_change_permission(request, coalition):
            raise PermissionDenied
        status = request.POST.get("status", "")
        try:
            coalition_set_status(tenant=coalition.tenant, coalition_id=coalition.pk, status=status)
        except ValidationError as e:
            self.report_service_error(request, e)
        else:
            self.log_change(request, coalition, f"Status set to {status}.")
            self.message_user(request, f"{coalition} is now {status}.", messages.SUCCESS)
        return HttpResponseRedirect(
            reverse("admin:coalitions_coalition_change", args=[coalition.pk])
        )

    formation_criteria_view = json_field_display("formation_criteria", "Formation criteria")
    business_config_view = json_field_display("business_config", "Business config")

    @admin.display(description="Members", ordering="_member_count")
    def member_count(self, obj):
        return obj._member_count

    # Writes --------------------------------------------------------------------------

    def save_model(self, request, obj, form, change):
        if change:
            changed = {f: form.cleaned_data[f] for f in form.changed_data if f in EDITABLE_FIELDS}
            if changed:
                with service_errors_as_form_errors():
                    coalition_update(tenant=obj.tenant, coalition_id=obj.pk, **changed)
            return
        data = form.cleaned_data
        with service_errors_as_form_errors():
            coalition = coalition_create(
                tenant=self.tenant_for_new(request, form),
                name=data["name"],
                business_model=data["business_model"],
                initial_capital=data["initial_capital"],
                formation_criteria=data["formation_criteria"],
                business_config=data["business_config"],
            )
        # The members formset, redirect and log entry that follow need the saved row.
        adopt_created(obj, coalition)

    def save_formset(self, request, form, formset, change):
        if formset.model is not CoalitionMember:
            return super().save_formset(request, form, formset, change)
        coalition, deleted = form.instance, formset.deleted_forms
        update, changed, removed = [], [], []
        for member_form in formset.initial_forms:
            if "agent" in member_form.changed_data:
                with service_errors_as_form_errors():
                    raise ValidationError({"agent": MEMBER_AGENT_FIXED})
            if member_form in deleted:
                removed.append(member_form.instance)
                continue
            edits = {
                f: member_form.cleaned_data[f]
                for f in member_form.changed_data
                if f in ("role", "contribution_score")
            }
            if edits:
                update.append({"agent_id": member_form.instance.agent_id, **edits})
                changed.append((member_form.instance, list(edits)))
        add = [
            {
                "agent_id": f.cleaned_data["agent"].pk,
                "role": f.cleaned_data["role"],
                "contribution_score": f.cleaned_data["contribution_score"],
            }
            for f in formset.extra_forms
            if f.has_changed() and f not in deleted
        ]
        with service_errors_as_form_errors():
            added = coalition_members_sync(
                tenant=coalition.tenant,
                coalition_id=coalition.pk,
                update=update,
                remove=[m.agent_id for m in removed],
                add=add,
            )
        # What ModelAdmin.construct_change_message reads for the history entry.
        formset.new_objects, formset.changed_objects, formset.deleted_objects = (
            added,
            changed,
            removed,
        )

    # Actions -------------------------------------------------------------------------

    activate = status_action("Activate selected coalitions", CoalitionStatus.ACTIVE, "activated")
    mark_profitable = status_action(
        "Mark selected coalitions profitable", CoalitionStatus.PROFITABLE, "marked profitable"
    )
    dissolve = status_action("Dissolve selected coalitions", CoalitionStatus.DISSOLVED, "dissolved")

    def _set_status(self, request, queryset, status: str, verb: str) -> None:
        done = 0
        # Each transition is its own service call: one coalition refused by the status
        # rules does not hold back the others, and the operator is told which.
        for coalition in queryset.select_related("tenant"):
            try:
                coalition_set_status(
                    tenant=coalition.tenant, coalition_id=coalition.pk, status=status
                )
            except ValidationError as e:
                for message in e.messages:
                    self.message_user(request, f"{coalition}: {message}", messages.ERROR)
            else:
                self.log_change(request, coalition, f"Status set to {status}.")
                done += 1
        if done:
            self.message_user(request, f"{done} coalition(s) {verb}.", messages.SUCCESS)

    @admin.action(description="Export selected coalitions as CSV", permissions=["view"])
    def export_csv(self, request, queryset):
        return csv_response(
            request, "coalitions.csv", COALITION_EXPORT_HEADER, coalition_export_rows(queryset)
        )
