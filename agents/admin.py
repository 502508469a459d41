from django.contrib import admin
from django.utils.html import format_html_join

from agents.beliefs import belief_summary
from agents.models import Agent, Tenant


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "created_at"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    readonly_fields = ["created_at"]


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
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
    readonly_fields = ["id", "belief_state_summary", "created_at", "updated_at"]
    fields = [
        "id",
        "tenant",
        "name",
        "agent_type",
        "status",
        "energy_level",
        "location_h3",
        "personality_traits",
        "belief_state_summary",
        "last_active_at",
        "created_at",
        "updated_at",
    ]

    def get_queryset(self, request):
        qs = super().get_queryset(request)
        # The list never shows beliefs, so it never pays to decrypt them.
        if request.resolver_match and request.resolver_match.url_name.endswith("changelist"):
            qs = qs.defer("belief_state")
        return qs

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
