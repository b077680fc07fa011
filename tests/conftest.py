import os
from pathlib import Path

import pytest
import torch

# Golden data from the official implementation lives beside the repository, never inside it.
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def fixture_path(name: str) -> Path:
    """An official fixture file. Absent in a user's clone: the test skips, saying why; absent under CI (which
    has it): the test fails, so a moved or renamed fixture cannot silently turn parity tests off."""
    path = FIXTURES / name
    if not path.exists():
        why = (f"official fixture {path} is absent (it ships beside the repository as "
               f"../shared/fixtures/official; a plain clone does not have it)")
        if os.environ.get("CI"):
            pytest.fail(why + "; under CI it must be there")
        pytest.skip(why)
    return path


@pytest.fixture
def tiny_cfg():
    from loca.config import load_config
    return load_config("cpu_tiny")
