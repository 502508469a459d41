import pytest

pytestmark = pytest.mark.django_db


@pytest.mark.reliability("metrics outages")
def test_the_outbox_page_says_not_configured_without_influxdb(superuser_client, settings):
    settings.INFLUXDB_URL = ""
    page = superuser_client.get("/admin/metrics/outboxpoint/").content.decode()
    assert "Metrics outbox: not configured (INFLUXDB_URL is unset)" in page
    assert "flowing" not in page
