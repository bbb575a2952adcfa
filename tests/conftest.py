"""Shared fixtures: the demo shards are built once per session (seconds) from the committed data/."""
import pytest


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    from pipeline.data.demo import build_demo_shards

    root = tmp_path_factory.mktemp("shards")
    build_demo_shards(root, progress=False)
    return root


from helpers.slurm_cluster import slurm_cluster  # noqa: E402,F401  (session fixture: a real local Slurm)


def pytest_collection_modifyitems(items):
    """Tests that run jobs on the local Slurm are slow; a slow test (one that starts processes) in tests/unit is
    an error, so `make test-fast` stays the quick edit loop."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slow") and item.path.parent.name == "unit":
            raise pytest.UsageError(f"{item.nodeid} starts processes (marked slow): move it to tests/integration "
                                    f"or tests/system")
