"""Back office for tenants, agents, API tokens and operator memberships.

Thin by design: every write calls agents.services, reads use agents.selectors where one
exists, and agents.admin_scoping keeps each operator inside their own tenant.
"""

import datetime
from collections import defaultdict

import h3
from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.admin.utils import flatten_fieldsets, unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import formats, timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode

from agents.admin_scoping import (
    TenantScopedAdminMixin,
    TenantScopedInlineMixin,
    adopt_created,
    csv_response,
    is_unscoped,
    json_field_display,
    main_fieldset,
    service_errors_as_form_errors,
    status_action,
)
from agents.beliefs import belief_summary
from agents.models import (
    Agent,
    AgentStatus,
    ApiToken,
    OperatorMembership,
    Tenant,
    TenantDataKey,
)
from agents.selectors import (
    AGENT_EXPORT_HEADER,
    agent_export_rows,
    agent_history,
    agents_near,
)
from agents.services import (
    AgentSpec,
    agent_create,
    agent_delete,
    agent_update_state,
    agents_delete,
    agents_set_status,
)
from agents.svg import MAX_CELLS, hex_map_svg, neighbourhood_svg
from agents.types import AgentStateUpdate, micros
from coalitions.selectors import tenant_overview
from metrics.charts import agent_metrics_chart
from realtime.services import api_token_create, api_token_revoke

NEIGHBOURHOOD_RADIUS = 3
HISTORY_ROWS = 10
METRICS_HOURS = 24
# The fields agent_update_state can change; name and type are fixed at creation.
_UPDATABLE = ("status", "energy_level", "location_h3", "personality_traits")
# A new agent's fields: name and type, then those agent_update_state can change later.
_CREATED_WITH = ["name", "agent_type", *_UPDATABLE]
# The Live page: agents drawn from the page itself until the websocket's snapshot (which
# has them all) arrives, dots the browser draws at most, and rings of empty cells drawn
# around the occupied ones so agents have somewhere to move to.
LIVE_INITIAL_AGENTS = 5000
LIVE_MAX_MARKERS = 2000
LIVE_MAP_MARGIN = 1


def _ids_by_tenant(queryset) -> list[tuple[Tenant, list]]:
    """The selected agents' ids grouped by tenant: the services work within one tenant."""
    ids = defaultdict(list)
    for agent_id, tenant_id in queryset.values_list("pk", "tenant_id"):
        ids[tenant_id].append(agent_id)
    tenants = Tenant.objects.in_bulk(list(ids))
    return [(tenants[tenant_id], agent_ids) for tenant_id, agent_ids in ids.items()]


def _live_agent(agent_id, name, agent_type, status, energy, cell, updated_at) -> dict:
    """An agent as the websocket's frames carry it (realtime.protocol.agent_data)."""
    lat, lng = h3.cell_to_latlng(cell) if cell else (None, None)
    return {
        "agent_id": str(agent_id),
        "data": {
            "name": name,
            "agent_type": agent_type,
            "energy_level": energy,
            "status": status,
            "location_h3": cell,
            "lat": lat,
            "lng": lng,
            "version": micros(updated_at),
            "updated_at": updated_at.isoformat(),
        },
    }


def _with_every_status(by_status) -> list[tuple[str, int]]:
    counts = dict(by_status)
    return [(status, counts.pop(status, 0)) for status in AgentStatus.values] + sorted(
        counts.items()
    )


class TenantDataKeyInline(TenantScopedInlineMixin, admin.TabularInline):
    """The tenant's data keys as rotation leaves them (never the key material).
    Rotation is a command (README "Rotate a tenant's data key"), not a button."""

    model = TenantDataKey
    extra = 0
    can_delete = False
    fields = readonly_fields = [
        "key_id",
        "state",
        "created_at",
        "retired_at",
        "destroyed_at",
        "rows_remaining",
        "counted_at",
    ]
    verbose_name_plural = "data keys (rows remaining: as the last re-encryption pass counted)"

    @admin.display(description="Key id")
    def key_id(self, obj):
        # The id tokens carry in their header (FAE1 | id | token).
        return obj.id

    def has_view_permission(self, request, obj=None):
        # Whoever may see the tenant may see its keys' metadata (no group grants the
        # key model itself).
        return self.has_tenant_scope(request) and request.user.has_perm("agents.view_tenant")

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Tenant)
class TenantAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    tenant_path = "pk"
    inlines = [TenantDataKeyInline]
    list_display = ["name", "slug", "created_at", "overview_link"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    # The id is the tenant's identity (tokens, keys and exports carry it): shown, never
    # edited, as on the agent page; a new tenant gets its id when saved.
    readonly_fields = ["id", "created_at", "overview_link"]
    object_views = {"overview": "overview_view", "live": "live_view"}

    def get_fields(self, request, obj=None):
        fields = super().get_fields(request, obj)
        if obj is None:
            return [f for f in fields if f != "id"]
        return ["id", *(f for f in fields if f != "id")]

    @admin.display(description="Overview")
    def overview_link(self, obj):
        if obj.pk is None:
            return "—"
        return format_html(
            '<a href="{}" class="tenant-overview-link">Overview</a> · '
            '<a href="{}" class="tenant-live-link">Live</a>',
            reverse("admin:agents_tenant_overview", args=[obj.pk]),
            reverse("admin:agents_tenant_live", args=[obj.pk]),
        )

    def overview_view(self, request, object_id):
        tenant = self.get_object(request, unquote(object_id))
        if not self.has_view_permission(request, tenant):
            raise PermissionDenied
        overview = tenant_overview(tenant=tenant)
        context = {
            **self.admin_site.each_context(request),
            "title": f"{tenant}: overview",
            "subtitle": None,
            "opts": self.opts,
            "original": tenant,
            "tenant": tenant,
            "has_view_permission": True,
            "density_svg": hex_map_svg(
                counts=overview["cells"],
                svg_id="tenant-density",
                title=f"Agents per H3 cell in {tenant}",
            ),
            **overview,
        }
        return TemplateResponse(request, "admin/agents/tenant/overview.html", context)

    def live_view(self, request, object_id):
        """The tenant's agents on the H3 map, kept current over /ws/agents/ by
        realtime/static/realtime/stream.js (docs/README-live.md)."""
        tenant = self.get_object(request, unquote(object_id))
        # The websocket streams agents, so the page asks what the stream will: seeing
        # the tenant and its agents (realtime.auth refuses operators without the latter).
        if not (
            self.has_view_permission(request, tenant) and request.user.has_perm("agents.view_agent")
        ):
            raise PermissionDenied
        overview = tenant_overview(tenant=tenant)
        counts = dict(overview["cells"])
        for cell in list(counts):
            for ring_cell in h3.grid_disk(cell, LIVE_MAP_MARGIN):
                counts.setdefault(ring_cell, 0)
        # The cells hex_map_svg keeps, in its order; their centres let the page place an
        # agent in any cell, drawn or not (agents move).
        drawn = sorted(counts, key=lambda cell: (-counts[cell], cell))[:MAX_CELLS]
        agents = list(
            Agent.objects.filter(tenant=tenant)
            .order_by("name", "id")
            .values_list(
                "id", "name", "agent_type", "status", "energy_level", "location_h3", "updated_at"
            )[: LIVE_INITIAL_AGENTS + 1]
        )
        config = {
            "url": "/ws/agents/?" + urlencode({"tenant": tenant.slug}),
            "statuses": list(AgentStatus.values),
            "centres": {cell: h3.cell_to_latlng(cell) for cell in drawn},
            "agents": [_live_agent(*row) for row in agents[:LIVE_INITIAL_AGENTS]],
            # More agents than the page carries: counts wait for the snapshot.
            "complete": len(agents) <= LIVE_INITIAL_AGENTS,
            "maxMarkers": LIVE_MAX_MARKERS,
        }
        context = {
            **self.admin_site.each_context(request),
            "title": f"{tenant}: live",
            "subtitle": None,
            "opts": self.opts,
            "original": tenant,
            "tenant": tenant,
            "has_view_permission": True,
            "map_svg": hex_map_svg(
                counts={cell: counts[cell] for cell in drawn},
                svg_id="live-map",
                title=f"Agents of {tenant}, live",
            ),
            "agents_by_status": _with_every_status(overview["agents_by_status"]),
            "agent_count": overview["agent_count"],
            "live_config": config,
        }
        return TemplateResponse(request, "admin/agents/tenant/live.html", context)


@admin.register(Agent)
class AgentAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    list_display = [
        "name",
        "agent_type",
        "tenant",
        "status",
        "energy_level",
        "location_h3",
        "last_active_at",
    ]
    list_filter = ["status", "agent_type", "tenant"]
    search_fields = ["name", "agent_type", "location_h3", "=id"]
    list_select_related = ["tenant"]
    date_hierarchy = "last_active_at"
    actions = ["suspend_agents", "activate_agents", "export_csv"]
    add_fieldsets = [(None, {"fields": ["tenant", *_CREATED_WITH]})]
    fieldsets = [
        main_fieldset(*_CREATED_WITH, "last_active_at", "created_at", "updated_at"),
        ("Beliefs", {"fields": ["belief_state_summary"]}),
        ("Neighbourhood", {"fields": ["neighbourhood_map"]}),
        ("Metrics", {"fields": ["metrics_chart"]}),
        ("Latest states", {"fields": ["latest_history"]}),
    ]
    change_readonly_fields = [
        "id",
        "tenant",
        "name",
        "agent_type",
        "last_active_at",
        "created_at",
        "updated_at",
        "belief_state_summary",
        "neighbourhood_map",
        "metrics_chart",
        "latest_history",
        "personality_traits_view",
    ]
    json_displays = {"personality_traits": "personality_traits_view"}

    def get_readonly_fields(self, request, obj=None):
        return self.change_readonly_fields if obj is not None else []

    def get_queryset(self, request):
        qs = super().get_queryset(request)
        # Beliefs decrypt as rows load; only the change page shows them (summarised), so
        # lists, autocomplete, actions and delete pages never pay for it.
        match = request.resolver_match
        if match is None or match.url_name != "agents_agent_change":
            qs = qs.defer("belief_state")
        return qs

    # Writes --------------------------------------------------------------------------

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        with service_errors_as_form_errors():
            if change:
                changes = {name: data[name] for name in form.changed_data if name in _UPDATABLE}
                if changes:
                    agent_update_state(
                        tenant=obj.tenant, update=AgentStateUpdate(agent_id=obj.pk, **changes)
                    )
                return
            state = agent_create(
                tenant=self.tenant_for_new(request, form),
                spec=AgentSpec(
                    name=data["name"],
                    agent_type=data["agent_type"],
                    energy_level=data["energy_level"],
                    location_h3=data["location_h3"] or None,
                    status=data["status"],
                    personality_traits=data["personality_traits"],
                ),
            )
        # The redirect and the log entry that follow need the new row's id.
        obj.pk, obj.tenant_id = state.id, state.tenant_id
        obj._state.adding = False

    def delete_model(self, request, obj):
        with service_errors_as_form_errors():
            agent_delete(tenant=obj.tenant, agent_id=obj.pk)

    def delete_queryset(self, request, queryset):
        try:
            with transaction.atomic():
                for tenant, ids in _ids_by_tenant(queryset):
                    agents_delete(tenant=tenant, agent_ids=ids)
        except ValidationError as e:
            self.report_service_error(request, e)

    # Actions -------------------------------------------------------------------------

    suspend_agents = status_action("Suspend selected agents", AgentStatus.SUSPENDED, "suspended")
    activate_agents = status_action("Activate selected agents", AgentStatus.ACTIVE, "activated")

    def _set_status(self, request, queryset, status: str, verb: str) -> None:
        try:
            # An operator's selection is one tenant; a superuser's may span several: all
            # of them change or none.
            with transaction.atomic():
                changed = [
                    agent_id
                    for tenant, ids in _ids_by_tenant(queryset)
                    for agent_id in agents_set_status(tenant=tenant, agent_ids=ids, status=status)
                ]
        except ValidationError as e:
            self.report_service_error(request, e)
            return
        if changed:
            LogEntry.objects.log_actions(
                request.user.pk,
                Agent.objects.filter(pk__in=changed).only("pk", "name"),
                CHANGE,
                f"Status set to {status}.",
            )
        self.message_user(request, f"{len(changed)} agent(s) {verb}.", messages.SUCCESS)

    @admin.action(description="Export selected agents as CSV", permissions=["view"])
    def export_csv(self, request, queryset):
        return csv_response(request, "agents.csv", AGENT_EXPORT_HEADER, agent_export_rows(queryset))

    # Change page -----------------------------------------------------------------------

    personality_traits_view = json_field_display("personality_traits", "Personality traits")

    @admin.display(description="Belief state")
    def belief_state_summary(self, obj):
        summary = belief_summary(obj.belief_state)
        if summary is None:
            return "—"
        rows = [
            ("Shape", " x ".join(map(str, summary["shape"])) or "scalar"),
            ("Dtype", summary["dtype"]),
            ("Entropy", f"{summary['entropy']:.4f} nats"),
            ("Max", f"{summary['max']:.4f}" if summary["max"] is not None else "—"),
        ]
        return format_html_join("", "<div><strong>{}</strong>: {}</div>", rows)

    @admin.display(description="H3 neighbourhood")
    def neighbourhood_map(self, obj):
        if not obj.location_h3:
            return "No location yet."
        try:
            nearby = agents_near(
                tenant=obj.tenant, cell=obj.location_h3, radius=NEIGHBOURHOOD_RADIUS
            )
        except ValidationError as e:
            return "; ".join(e.messages)
        picture = neighbourhood_svg(agent=obj, nearby=nearby, radius=NEIGHBOURHOOD_RADIUS)
        return format_html(
            '<div class="agent-neighbourhood">{}<p class="help">Cells within {} rings of {}, '
            "darker where more active agents are. Red: this agent; yellow: active agents "
            "nearby ({} in all). Hover for names.</p></div>",
            picture,
            NEIGHBOURHOOD_RADIUS,
            obj.location_h3,
            sum(1 for a in nearby if a.id != obj.pk),
        )

    @admin.display(description=f"Metrics, last {METRICS_HOURS} hours")
    def metrics_chart(self, obj):
        # Never raises: without InfluxDB it returns a message saying why there is no chart.
        return agent_metrics_chart(obj.pk, obj.tenant_id, hours=METRICS_HOURS)

    @admin.display(description="Latest states")
    def latest_history(self, obj):
        rows = agent_history(
            tenant=obj.tenant,
            agent_id=obj.pk,
            # No state can predate the agent; the upper bound allows for clock skew
            # between this host and the database that stamps recorded_at.
            since=obj.created_at,
            until=timezone.now() + datetime.timedelta(days=1),
            limit=HISTORY_ROWS,
        )
        if not rows:
            return "No state updates recorded yet."
        cells = []
        for row in rows:
            summary = belief_summary(row["beliefs"])
            cells.append(
                (
                    # As the admin shows every other time (DATETIME_FORMAT, the
                    # current time zone); exports keep ISO 8601.
                    formats.date_format(timezone.localtime(row["recorded_at"]), "DATETIME_FORMAT"),
                    "—" if row["energy_level"] is None else row["energy_level"],
                    "—" if summary is None else f"{summary['entropy']:.4f}",
                    "—" if summary is None else f"{summary['max']:.4f}",
                )
            )
        return format_html(
            '<table class="agent-history"><thead><tr><th>Recorded at</th><th>Energy</th>'
            "<th>Belief entropy (nats)</th><th>Max belief</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", cells),
        )


@admin.register(ApiToken)
class ApiTokenAdmin(TenantScopedAdminMixin, admin.ModelAdmin):
    """Tokens are created through api_token_create, whose plaintext is shown on the
    response page and nowhere else, and retired by revoking, never edited or deleted."""

    list_display = [
        "name",
        "prefix",
        "tenant",
        "can_read_beliefs",
        "active",
        "created_by",
        "created_at",
        "last_used_at",
        "revoked_at",
    ]
    list_filter = ["can_read_beliefs", ("revoked_at", admin.EmptyFieldListFilter), "tenant"]
    search_fields = ["name", "prefix"]
    list_select_related = ["tenant", "created_by"]
    actions = ["revoke_tokens"]
    add_fieldsets = [(None, {"fields": ["tenant", "name", "can_read_beliefs"]})]
    fieldsets = [
        main_fieldset(
            "name",
            "prefix",
            "can_read_beliefs",
            "created_by",
            "created_at",
            "last_used_at",
            "revoked_at",
        )
    ]

    def get_readonly_fields(self, request, obj=None):
        return flatten_fieldsets(self.fieldsets) if obj is not None else []

    def has_delete_permission(self, request, obj=None):
        # A revoked row keeps the record of who made the token and when it was used.
        return False

    @admin.display(description="Active", boolean=True)
    def active(self, obj):
        return obj.is_active

    def save_model(self, request, obj, form, change):
        if change:
            return  # every field of an existing token is read-only
        with service_errors_as_form_errors():
            token, plaintext = api_token_create(
                tenant=self.tenant_for_new(request, form),
                name=form.cleaned_data["name"],
                created_by=request.user,
                can_read_beliefs=form.cleaned_data["can_read_beliefs"],
            )
        adopt_created(obj, token)
        # Lives only until response_add renders it: not in the session, a message
        # cookie or the log entry.
        obj._plaintext = plaintext

    def response_add(self, request, obj, post_url_continue=None):
        plaintext = getattr(obj, "_plaintext", None)
        if plaintext is None:
            return super().response_add(request, obj, post_url_continue)
        context = {
            **self.admin_site.each_context(request),
            "title": "API token created",
            "subtitle": None,
            "opts": self.opts,
            "token": obj,
            "plaintext": plaintext,
        }
        response = TemplateResponse(request, "admin/agents/apitoken/created.html", context)
        response["Cache-Control"] = "no-store"
        return response

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke_tokens(self, request, queryset):
        revoked = 0
        for token in queryset.filter(revoked_at__isnull=True):
            api_token_revoke(token=token)
            revoked += 1
        self.message_user(request, f"{revoked} token(s) revoked.", messages.SUCCESS)


@admin.register(OperatorMembership)
class OperatorMembershipAdmin(admin.ModelAdmin):
    """Superusers tie operators to tenants; operators never see memberships, so they
    cannot move themselves (or anyone) to another tenant."""

    list_display = ["user", "tenant", "created_at"]
    list_select_related = ["user", "tenant"]
    search_fields = ["user__username", "tenant__name", "tenant__slug"]
    autocomplete_fields = ["user", "tenant"]
    readonly_fields = ["created_at"]

    def has_module_permission(self, request):
        return is_unscoped(request.user)

    def has_view_permission(self, request, obj=None):
        return is_unscoped(request.user)

    def has_add_permission(self, request):
        return is_unscoped(request.user)

    def has_change_permission(self, request, obj=None):
        return is_unscoped(request.user)

    def has_delete_permission(self, request, obj=None):
        return is_unscoped(request.user)
