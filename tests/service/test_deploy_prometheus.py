"""deploy/prometheus/: promtool accepts the scrape config and the alert rules, and every metric a
rule reads is one the service really exposes (a renamed metric would leave an alert silent)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.test_metrics import _full_registry, _tool

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
TOKEN_FILE = "/etc/prometheus/cicw-read-token"

# Words of PromQL that read like metric names: operators, modifiers and the functions the rules
# may call (a function is also recognised by the "(" after it).
_KEYWORDS = frozenset({"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                       "bool", "offset", "inf", "nan"})
# Label lists of by/without/on/ignoring/group_*: their words are label names, not metrics.
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# A selector's label matchers and a range or subquery: no metric names inside.
_BRACED = re.compile(r"\{[^}]*\}|\[[^\]]*\]")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?=\s*[{\[)]|\s|$)(?!\s*\()")


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (identifiers followed by a selector, a range,
    ")" or whitespace, less keywords; never one followed by "(": a function or aggregation)."""
    bare = _BRACED.sub(" ", _LABEL_LIST.sub(" ", _STRING.sub(" ", expr)))
    return {name for name in _IDENTIFIER.findall(bare) if name.lower() not in _KEYWORDS}


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _exposed_names() -> set[str]:
    text = generate_latest(_full_registry()).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_promtool_accepts_the_scrape_config_and_its_rules(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    config = (DEPLOY / "prometheus.yml").read_text()
    assert TOKEN_FILE in config
    # promtool checks that the token file exists: point the config at one in tmp_path.
    (tmp_path / "token").write_text("secret\n")
    (tmp_path / "prometheus.yml").write_text(config.replace(TOKEN_FILE, str(tmp_path / "token")))
    shutil.copy(DEPLOY / "alerts.yml", tmp_path / "alerts.yml")
    for args in (["check", "config", str(tmp_path / "prometheus.yml")],
                 ["check", "rules", str(DEPLOY / "alerts.yml")]):
        out = subprocess.run([str(promtool), *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (args, out.stdout, out.stderr)


def test_each_alert_fires_when_it_should_and_not_on_its_look_alike(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    # promtool's unit tests compare annotations too: the tests pin when alerts fire, not their
    # wording, so they run against a copy of the rules without annotations.
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            del rule["annotations"]
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    shutil.copy(DEPLOY / "alerts_test.yml", tmp_path / "alerts_test.yml")
    out = subprocess.run([str(promtool), "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, (out.stdout, out.stderr)
    tested = set(re.findall(r"alertname: (\w+)", (DEPLOY / "alerts_test.yml").read_text()))
    assert tested == {rule["alert"] for rule in _rules()}


def test_the_scrape_config_keeps_the_job_label_of_the_service() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (service,) = [c for c in config["scrape_configs"] if c["job_name"] == "cicw-stream"]
    assert service["honor_labels"] is True
    assert config["rule_files"] == ["alerts.yml"]


@pytest.mark.parametrize(("expr", "names"), [
    ('rate(cicw_records_trained_total{job="a"}[5m]) > 0', {"cicw_records_trained_total"}),
    ("sum by (job) (x_total) / on (job) group_left (state) y == 1 unless z", {"x_total", "y", "z"}),
    ("histogram_quantile(0.9, rate(h_bucket[5m] offset 1h))", {"h_bucket"}),
    ('absent(cicw_records_trainedd_total{state="FAILED"})', {"cicw_records_trainedd_total"}),
])
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert _metric_names(expr) == names


def test_a_misspelt_metric_is_not_in_the_exposition() -> None:
    assert not _metric_names("rate(cicw_records_trainedd_total[5m])") <= _exposed_names()


def test_every_rule_reads_only_metrics_the_service_exposes() -> None:
    exposed = _exposed_names()
    for rule in _rules():
        used = _metric_names(str(rule["expr"]))
        assert used, rule["alert"]
        assert used <= exposed, (rule["alert"], used - exposed)


def test_every_alert_waits_has_a_severity_and_says_what_to_do() -> None:
    for rule in _rules():
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
