"""The fast tier keeps itself fast: tests/conftest.py fails an unmarked test whose call runs over the
limit, lets a ``slow`` one run as long as it takes, and puts the PACS and browser tests in the slow tier;
on a busy machine the limit grows with the load."""

from __future__ import annotations

import conftest
import pytest

pytest_plugins = ["pytester"]

SLEEPY = """
import time
import pytest

def test_unmarked():
    time.sleep(0.5)

@pytest.mark.slow
def test_marked():
    time.sleep(0.5)

def test_quick():
    pass
"""


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, limit: float, *args: str) -> pytest.RunResult:
    """Run the tests written into ``pytester`` with tests/conftest.py's hooks at ``limit`` seconds (set
    for the inner run only: this test's own call is judged at the real limit)."""
    pytester.makeini("[pytest]\nmarkers =\n    slow\n    browser\n    pacs\n")
    with monkeypatch.context() as patch:
        patch.setattr(conftest, "FAST_TEST_LIMIT_S", limit)
        patch.setattr(conftest, "load_factor", lambda: 1.0)  # whatever else the machine is doing
        return pytester.runpytest_inprocess("-p", "no:cacheprovider", *args, plugins=[conftest])


def test_an_unmarked_test_over_the_limit_fails_and_a_slow_one_does_not(pytester: pytest.Pytester,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_sleepy=SLEEPY)
    result = run(pytester, monkeypatch, 0.2)  # the sleeps take at least 0.5 s
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_unmarked took *over the fast tier's 0.2 s*mark it @pytest.mark.slow*"])
    assert "slowest" in result.stdout.str()  # --durations is on without being asked for


def test_the_limit_can_be_turned_off(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_sleepy=SLEEPY)
    run(pytester, monkeypatch, 0.0).assert_outcomes(passed=3)


def test_pacs_and_browser_tests_are_in_the_slow_tier(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_fakepacs="def test_a(): pass\n", test_other="""
import pytest

@pytest.mark.browser
def test_b(): pass

def test_c(): pass
""")
    monkeypatch.setattr(conftest, "PACS_MODULES", {"test_fakepacs.py"})  # not test_listen.py: imported already
    run(pytester, monkeypatch, 5.0, "-m", "not slow").assert_outcomes(passed=1, deselected=2)


def test_a_busy_machine_raises_the_limit(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_sleepy=SLEEPY)
    pytester.makeini("[pytest]\nmarkers =\n    slow\n")
    with monkeypatch.context() as patch:
        patch.setattr(conftest, "FAST_TEST_LIMIT_S", 0.2)
        patch.setattr(conftest, "load_factor", lambda: 4.0)  # four times as busy as its cores: 0.8 s
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider", plugins=[conftest])
    result.assert_outcomes(passed=3)
    monkeypatch.setattr(conftest.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    monkeypatch.setattr(conftest.os, "cpu_count", lambda: 2)
    assert conftest.load_factor() == 4.5
    monkeypatch.setattr(conftest.os, "getloadavg", lambda: (0.5, 0.0, 0.0))
    assert conftest.load_factor() == 1.0
