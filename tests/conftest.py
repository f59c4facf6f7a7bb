import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Generated tiny models are cached inside the checkout unless the caller chose a cache.
os.environ.setdefault("PDSERVE_CACHE", os.path.join(ROOT, ".cache"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report gets the logs its fixtures named (`item.failure_logs`: a function
    returning (title, text) pairs), e.g. the daemons' log lines written during the test: what a
    failure in CI leaves to read."""
    report = yield
    logs = getattr(item, "failure_logs", None)
    if report.failed and logs is not None:
        try:
            for title, text in logs():
                report.sections.append((title, text))
        except Exception as e:  # (the report matters more than its logs)
            report.sections.append(("logs", f"could not be read: {e!r}"))
    return report
