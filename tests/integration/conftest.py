"""Everything under tests/integration is marked ``integration``.

Integration tests need real binaries (PostgreSQL, psql, ...).  They are not
skipped when those are missing: CI installs them (.ci/run), and a missing
binary must fail loudly.  Deselect with ``-m 'not integration'``.
"""

import os

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if os.path.abspath(str(item.path)).startswith(_HERE + os.sep):
            item.add_marker(pytest.mark.integration)
