"""The skip-or-fail rule for tests whose environment (a Slurm cluster, Chromium) may be missing."""

from __future__ import annotations

import pytest

from tests.helpers import skip_or_fail


def test_outside_ci_a_missing_environment_skips_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium here"):
        skip_or_fail("no Chromium here")


@pytest.mark.parametrize("value", ["true", "True"])
def test_under_ci_a_missing_environment_fails_with_its_reason(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=r"Slurm cannot start here: x \(CI=true"):
        skip_or_fail("Slurm cannot start here: x")
