"""The Prometheus alert rules (monitoring/prometheus/alerts.yml): promtool accepts them and
passes their unit tests (alerts_test.yml), every alert is tested firing and silent, and
every metric they read is one the application really exports."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

# Importing the selectors creates the cache counter's children (belief/membership,
# hit/miss), so its label values can be checked against the rules' matchers.
import agents.selectors  # noqa: F401
import coalitions.selectors  # noqa: F401
from freeagentics import telemetry
from monitoring import collectors, selectors

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "monitoring" / "prometheus" / "alerts_test.yml"
DEBIAN_PROMTOOL = Path("/usr/bin/promtool")
PROMTOOL_TIMEOUT = 300

METRIC = re.compile(r"\bfreeagentics_[a-z_]+")
SELECTOR = re.compile(r"\b(freeagentics_[a-z_]+)\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
QUANTILE_THRESHOLD = re.compile(
    r"histogram_quantile\(\s*0\.\d+,\s*sum by \(le\) \(rate\((freeagentics_[a-z_]+)_bucket"
    r"\[\w+\]\)\)\)\s*>\s*([0-9.]+)"
)
SEVERITIES = {"warning", "critical"}
REDIS_ALERT = "FreeAgenticsRedisLatencyHigh"


def alert_rules(path: Path = RULES) -> list[dict]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def run(promtool: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [promtool, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        check=False,
    )


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def promtool() -> str:
    """Debian's promtool (package prometheus); without it these tests fail, never skip."""
    found = shutil.which("promtool")
    if found is None and DEBIAN_PROMTOOL.exists():
        found = str(DEBIAN_PROMTOOL)
    if found is None:
        pytest.fail(
            "promtool is missing (not on PATH, not at /usr/bin/promtool): these tests need "
            "Debian's 'prometheus' package (apt-get install prometheus; scripts/test.sh "
            "installs it when run as root).",
            pytrace=False,
        )
    return found


@pytest.fixture
def _fresh_figures(settings, tmp_path):
    """Database figures read anew, from an empty backup storage."""
    settings.MONITORING_FIGURES_CACHE_SECONDS = 0
    settings.STORAGES = {
        **settings.STORAGES,
        "backups": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": tmp_path / "backups"},
        },
    }
    selectors.forget_figures()
    yield
    selectors.forget_figures()


def test_promtool_check_rules_accepts_every_rule(promtool):
    result = run(promtool, "check", "rules", RULES)

    assert result.returncode == 0, output(result)
    assert f"SUCCESS: {len(alert_rules())} rules found" in output(result)


def test_promtool_unit_tests_pass(promtool):
    result = run(promtool, "test", "rules", RULE_TESTS)

    assert result.returncode == 0, output(result)
    assert "SUCCESS" in output(result)
    assert "FAILED" not in output(result)


def test_promtool_check_rules_fails_on_a_bad_expression(promtool, tmp_path):
    groups = yaml.safe_load(RULES.read_text())
    groups["groups"][0]["rules"][0]["expr"] = "sum(rate(freeagentics_cache_requests_total[5m])"
    broken = tmp_path / "alerts.yml"
    broken.write_text(yaml.safe_dump(groups))

    result = run(promtool, "check", "rules", broken)

    assert result.returncode != 0, output(result)
    assert "parse error" in output(result)
    assert "SUCCESS" not in output(result)


def test_promtool_unit_tests_fail_when_a_threshold_is_wrong(promtool, tmp_path):
    # Redis' target moved from 10 ms to the next bucket edge: the firing case must notice.
    groups = yaml.safe_load(RULES.read_text())
    [rule] = [r for g in groups["groups"] for r in g["rules"] if r["alert"] == REDIS_ALERT]
    assert "> 0.01\n" in rule["expr"]
    rule["expr"] = rule["expr"].replace("> 0.01\n", "> 0.025\n")
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(groups))
    shutil.copy(RULE_TESTS, tmp_path / "alerts_test.yml")

    result = run(promtool, "test", "rules", tmp_path / "alerts_test.yml")

    assert result.returncode != 0, output(result)
    assert "FAILED" in output(result)
    assert f"alertname: {REDIS_ALERT}," in output(result)


def test_every_alert_has_for_severity_summary_and_description():
    rules = alert_rules()

    assert rules
    for rule in rules:
        assert "alert" in rule, f"a recording rule has no place here: {rule}"
        assert rule.get("for"), f"{rule['alert']} has no for:"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, rule["alert"]
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{rule['alert']} has no summary"
        assert annotations.get("description"), f"{rule['alert']} has no description"
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names repeat"


def test_every_alert_is_tested_firing_and_silent():
    alerts = {rule["alert"] for rule in alert_rules()}
    fires, silent = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])

    # promtool passes a silent case for an alert that does not exist at all.
    assert (fires | silent) <= alerts, f"tests of unknown alerts: {(fires | silent) - alerts}"
    assert alerts - fires == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested silent"


def test_latency_thresholds_sit_on_bucket_edges():
    # On an edge, histogram_quantile is exact at the threshold instead of interpolated.
    thresholds = [
        QUANTILE_THRESHOLD.search(rule["expr"])
        for rule in alert_rules()
        if "histogram_quantile" in rule["expr"]
    ]

    assert thresholds and all(thresholds), "a quantile rule is not in the expected form"
    for found in thresholds:
        assert float(found.group(2)) in telemetry.LATENCY_BUCKETS, found.group(0)


def exported() -> dict[str, dict[str, set[str]]]:
    """Every series name /metrics can carry, with the label values seen for each label."""
    names: dict[str, dict[str, set[str]]] = {}
    for family in REGISTRY.collect():
        if family.type == "counter":
            series = [f"{family.name}_total"]
        elif family.type == "histogram":
            series = [f"{family.name}{suffix}" for suffix in ("_bucket", "_count", "_sum")]
        else:
            series = [family.name]
        for name in series:
            names.setdefault(name, {})
        for sample in family.samples:
            if sample.name in names:
                for label, value in sample.labels.items():
                    names[sample.name].setdefault(label, set()).add(value)
    return names


def database_gauges() -> set[str]:
    """The gauges read from the database at scrape time; fails if a source is down, since
    its gauges are then left out."""
    families = collectors.DatabaseFigures().collect()
    [up] = [f for f in families if f.name == "freeagentics_monitoring_source_up"]
    down = {s.labels["source"] for s in up.samples if s.value != 1}
    assert down == set(), f"sources down, so their gauges cannot be checked: {down}"
    return {f.name for f in families}


@pytest.mark.django_db
@pytest.mark.usefixtures("_fresh_figures")
def test_database_figures_are_never_summed():
    # Every process reports the same database figures: sum() would multiply them.
    gauges = database_gauges()
    summed = re.compile(r"\bsum\b\s*(by\s*\([^)]*\)\s*)?\(\s*(\w+\()?\s*(freeagentics_[a-z_]+)")

    assert "freeagentics_metrics_outbox_points" in gauges
    assert summed.search("sum by (job) (freeagentics_metrics_outbox_points)")
    for rule in alert_rules():
        for found in summed.finditer(rule["expr"]):
            assert found.group(3) not in gauges, f"{rule['alert']} sums {found.group(3)}"


@pytest.mark.django_db
@pytest.mark.usefixtures("_fresh_figures")
def test_every_metric_in_the_rules_is_exported():
    assert telemetry.ENABLED, "PROMETHEUS_METRICS_ENABLED is off: nothing is exported"
    gauges = database_gauges()
    collectors.register()
    series = exported()
    # The annotations' names too: an operator told to look at a metric must find it.
    named = set(METRIC.findall(RULES.read_text()))
    read = {name for rule in alert_rules() for name in METRIC.findall(rule["expr"])}

    assert len(read) > 20
    assert named - series.keys() == set(), "metrics the application does not export"
    assert gauges - read == set(), "database figures no alert reads"
    for rule in alert_rules():
        for name, matchers in SELECTOR.findall(rule["expr"]):
            labels = series[name]
            assert labels, f"{rule['alert']}: {name} has no samples to check its labels"
            for label, op, value in MATCHER.findall(matchers):
                assert label in labels, f"{rule['alert']}: {name} has no label {label}"
                if op == "=":
                    assert value in labels[label], f"{rule['alert']}: {name}{{{label}={value!r}}}"
