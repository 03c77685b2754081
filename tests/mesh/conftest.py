import pytest

from meshd import statedir
from meshd.mesh import identity


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    """Three node identities (a, b, c), made once a module: key generation is slow."""
    return [identity.load_or_create(statedir.StateDir(tmp_path_factory.mktemp(n))) for n in "abc"]
