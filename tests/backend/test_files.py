"""Output files: written atomically (complete or absent) with the permissions the umask gives new files."""
import os
import stat

import pytest
import torch

from backend.adapters import build_adapter, load_adapter, save_adapter
from backend.files import atomic_file, atomic_write


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_gives_the_umask_permissions_and_leaves_no_temporary(tmp_path, umask_022):
    out = atomic_write(tmp_path / "sub" / "heat.tif", b"abc")
    assert out.read_bytes() == b"abc"
    assert mode(out) == 0o644  # not mkstemp's 0600
    assert os.listdir(out.parent) == ["heat.tif"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "regions.geojson"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["regions.geojson"]


def test_saved_adapters_are_readable_like_any_new_file(tiny, tmp_path, umask_022):
    torch.manual_seed(0)
    path = save_adapter(tmp_path / "coop.pt", build_adapter("coop", tiny))
    assert mode(path) == 0o644
    assert os.listdir(tmp_path) == ["coop.pt"]
    assert load_adapter(path, tiny).method == "coop"
