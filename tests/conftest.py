import os
from pathlib import Path

import pytest
import torch

# Golden data from the official implementation lives beside the repository, never inside it.
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"official fixture {path} is absent (it ships beside the repository as "
                    f"../shared/fixtures/official; a plain clone does not have it)")
    return path


@pytest.fixture
def tiny_cfg():
    from loca.config import load_config
    return load_config("cpu_tiny")
