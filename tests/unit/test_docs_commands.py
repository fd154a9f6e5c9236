"""The docs work to the letter (issue 33): every `disaggctl ...` line quoted in README.md and docs/ parses with the
real argument parser, every dotted config key they name exists in the schema, and every alert has a runbook section,
a runbook_url to it and a promtool test that sees it fire."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from daemons.config import Config
from daemons.ops.ctl import build_parser

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]
GENERATED = {REPO / "docs" / "reference" / "configuration.md", REPO / "docs" / "reference" / "metrics.md"}


def quoted_commands() -> list[tuple[str, str]]:
    """(page:line, the words after `disaggctl`) for every disaggctl command in a code span or block."""
    found = []
    for page in PAGES:
        in_block = False
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            pieces = [line] if in_block else re.findall(r"`([^`]*)`", line)
            for piece in pieces:
                for match in re.finditer(r"(?:^|[\s/])disaggctl(?=\s|$)(.*)", piece):
                    rest = re.split(r"\s(?:&&|\|\||\||;|#|>)\s?", match.group(1))[0]
                    found.append((f"{page.relative_to(REPO)}:{n}", rest.strip()))
    return found


COMMANDS = quoted_commands()


def test_the_docs_quote_disaggctl_commands() -> None:
    assert len(COMMANDS) > 20  # the scan finds them (README's and docs' command lines)


@pytest.mark.parametrize(("where", "words"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_quoted_disaggctl_command_parses(where: str, words: str) -> None:
    # Placeholders stand for any value: <daemon>, NAME, ...; "..." is "and so on".
    words = re.sub(r"<[^>]+>", "x", words).replace("…", "").replace("...", "")
    words = re.sub(r"\[(-[^\]]+)\]", r"\1", words)  # [--purge]: an option shown as optional
    words = re.sub(r"(?<![\w-])[A-Z][A-Z_]*(?![\w-])", "1", words)  # S, NAME, DAEMON: a value
    try:
        argv = shlex.split(words)
    except ValueError:
        pytest.fail(f"{where}: cannot split {words!r}")
    if not argv or all(a.startswith("-") and a in ("--help", "-h") for a in argv):
        return
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `disaggctl {words}` does not parse (exit {exc.code})")


def schema_keys() -> set[str]:
    keys: set[str] = set()

    def walk(model: type, prefix: str) -> None:
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            keys.add(prefix + name)
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                walk(sub, f"{prefix}{name}.")
            for arg in getattr(sub, "__args__", ()):
                if isinstance(arg, type) and hasattr(arg, "model_fields"):
                    walk(arg, f"{prefix}{name}.")

    walk(Config, "")
    return keys


SECTIONS = ("model", "lmcache", "lmcache_server", "prefill_worker", "decode_worker", "kv_path", "readiness", "logs",
            "cluster", "lmcache_coordinator")


def test_every_config_key_the_docs_name_exists() -> None:
    keys = schema_keys()
    missing = []
    for page in PAGES:
        if page in GENERATED:
            continue
        for n, line in enumerate(page.read_text().splitlines(), 1):
            for span in re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)`", line):
                first = span.split(".")[0]
                if first not in SECTIONS or span.endswith((".py", ".sh", ".yaml", ".md")):  # a file, not a key
                    continue
                parts = span.split(".")
                if parts[1] == "instances":  # decode_worker.instances.NAME.key: the key is the worker's
                    parts = [parts[0], *parts[3:]]
                if ".".join(parts) not in keys:
                    missing.append(f"{page.relative_to(REPO)}:{n}: `{span}`")
    assert not missing, "keys the docs name that the config does not have:\n" + "\n".join(missing)


def test_every_alert_has_a_runbook_section_a_url_to_it_and_a_promtool_test_that_fires_it() -> None:
    rules = yaml.safe_load((REPO / "deploy/prometheus/rules/disagg-alerts.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    runbooks = (REPO / "docs" / "runbooks.md").read_text()
    sections = set(re.findall(r"^## (\w+)$", runbooks, re.M))
    tests = yaml.safe_load((REPO / "tests/prometheus/alerts_test.yml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    for alert in alerts:
        name = alert["alert"]
        assert name in sections, f"{name}: no section in docs/runbooks.md"
        assert alert["annotations"]["runbook_url"].endswith(f"runbooks.md#{name.lower()}"), name
        assert alert["annotations"].get("description"), f"{name}: no description"
        assert name in fired, f"{name}: no promtool test expects it to fire"
    assert sections == {a["alert"] for a in alerts}, "runbook sections for alerts that do not exist"
