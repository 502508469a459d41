from django.contrib import admin
from django.urls import path

from monitoring import admin_views, views

urlpatterns = [
    path("metrics", views.metrics, name="metrics"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path(
        "admin/health/",
        admin.site.admin_view(admin_views.system_health),
        name="system_health",
    ),
]
