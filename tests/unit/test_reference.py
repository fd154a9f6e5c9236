"""docs/reference/ is generated from the code: a key, metric, path or rule changed without regenerating fails here."""

from __future__ import annotations

from pathlib import Path

from daemons.ops import reference


def test_the_committed_references_are_what_the_code_says() -> None:
    assert reference.main(["--check"]) == 0, "run `make reference` and commit docs/reference/"


def test_a_stale_reference_is_caught(tmp_path: Path) -> None:
    assert reference.main(["--out", str(tmp_path)]) == 0
    page = tmp_path / "configuration.md"
    assert "`decode_worker`" in page.read_text() and "`prefill_timeout_s`" in page.read_text()
    page.write_text(page.read_text().replace("prefill_timeout_s", "prefill_timeout"))
    assert reference.main(["--check", "--out", str(tmp_path)]) == 1


def test_every_request_path_and_reason_is_in_the_metrics_reference() -> None:
    from daemons.names import FallbackReason, RecomputeReason, RequestPath

    text = reference.metrics_reference()
    for member in (*RequestPath, *FallbackReason, *RecomputeReason):
        assert f"| `{member.value}` |" in text, member
    assert "DisaggKVPathBroken" in text
