from tests.integration.harness import spawn  # noqa: F401 - the fixture
