from django.contrib import admin
from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import path
from django.views.generic import RedirectView

urlpatterns = [
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
    path("admin/", admin.site.urls),
]

# Serves the admin's CSS/JS under DEBUG only (an empty list otherwise); production runs
# collectstatic behind a static file server.
urlpatterns += staticfiles_urlpatterns()
