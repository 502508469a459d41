from django.contrib import admin
from django.db.models import Count

from coalitions.models import Coalition, CoalitionMember


class CoalitionMemberInline(admin.TabularInline):
    model = CoalitionMember
    extra = 0
    autocomplete_fields = ["agent"]
    fields = ["agent", "role", "contribution_score", "joined_at"]
    readonly_fields = ["joined_at"]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("agent").defer("agent__belief_state")


@admin.register(Coalition)
class CoalitionAdmin(admin.ModelAdmin):
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
    readonly_fields = ["id", "created_at", "updated_at", "dissolved_at"]
    inlines = [CoalitionMemberInline]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_member_count=Count("memberships"))

    @admin.display(description="Members", ordering="_member_count")
    def member_count(self, obj):
        return obj._member_count
