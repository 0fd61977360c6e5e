"""Markers of the template's own tests."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the baked project's whole test suite (minutes)")
