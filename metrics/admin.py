from django.contrib import admin
from django.core.paginator import Paginator
from django.utils.functional import cached_property

from metrics.charts import outbox_indicator
from metrics.models import DroppedPoints, OutboxPoint, RejectedPoint
from metrics.selectors import outbox_status
from metrics.services import dropped_points_acknowledge


class _CountedPaginator(Paginator):
    """count(*) over millions of waiting rows would make the page as slow as the
    outage is long; the running count (metrics_outbox_count) is as exact and small."""

    @cached_property
    def count(self):
        return outbox_status().pending


class _SuperuserOnly:
    # Lines carry every tenant's ids; tenant operators must not browse them.
    def has_module_permission(self, request):
        return request.user.is_active and request.user.is_superuser

    def has_view_permission(self, request, obj=None):
        return request.user.is_active and request.user.is_superuser

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(OutboxPoint)
class OutboxPointAdmin(_SuperuserOnly, admin.ModelAdmin):
    list_display = ["id", "measurement", "created_at", "line_preview"]
    paginator = _CountedPaginator
    show_full_result_count = False
    list_per_page = 50

    def has_delete_permission(self, request, obj=None):
        # Deleting waiting points is exactly the loss the outbox exists to prevent.
        return False

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "metrics_indicator": outbox_indicator()}
        return super().changelist_view(request, extra_context=extra_context)

    @admin.display(description="Line")
    def line_preview(self, obj):
        return obj.line if len(obj.line) <= 120 else obj.line[:119] + "…"


@admin.register(RejectedPoint)
class RejectedPointAdmin(_SuperuserOnly, admin.ModelAdmin):
    list_display = ["id", "rejected_at", "error", "line"]
    readonly_fields = ["line", "error", "rejected_at"]

    def has_delete_permission(self, request, obj=None):
        return request.user.is_active and request.user.is_superuser


class _Acknowledged(admin.SimpleListFilter):
    title = "acknowledged"
    parameter_name = "acknowledged"

    def lookups(self, request, model_admin):
        return [("no", "Not yet"), ("yes", "Yes")]

    def queryset(self, request, queryset):
        if self.value() == "no":
            return queryset.filter(acknowledged_at__isnull=True)
        if self.value() == "yes":
            return queryset.filter(acknowledged_at__isnull=False)
        return queryset


@admin.register(DroppedPoints)
class DroppedPointsAdmin(_SuperuserOnly, admin.ModelAdmin):
    list_display = ["minute", "reason", "points", "last_dropped_at", "acknowledged_at"]
    list_filter = [_Acknowledged, "reason"]
    readonly_fields = ["minute", "reason", "points", "last_dropped_at", "acknowledged_at"]
    actions = ["acknowledge"]

    def has_delete_permission(self, request, obj=None):
        # The record of what was lost stays; rows are one per minute, so it stays small.
        return False

    def has_acknowledge_permission(self, request):
        return request.user.is_active and request.user.is_superuser

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "metrics_indicator": outbox_indicator()}
        return super().changelist_view(request, extra_context=extra_context)

    @admin.action(
        description="Acknowledge selected drops (the outbox indicator stops counting them)",
        permissions=["acknowledge"],
    )
    def acknowledge(self, request, queryset):
        count = dropped_points_acknowledge(ids=list(queryset.values_list("id", flat=True)))
        self.message_user(request, f"{count} row(s) of dropped points acknowledged.")
