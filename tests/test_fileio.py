import os
import stat

import numpy as np
import pytest

from boneage.errors import InputError
from boneage.fileio import atomic_write_png, atomic_write_text, read_gray


def test_atomic_write_leaves_no_temporary_and_normal_permissions(tmp_path):
    out = tmp_path / "sub" / "a.txt"
    atomic_write_text(out, "hello")
    assert out.read_text() == "hello"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_png_roundtrip_and_errors_name_the_file(tmp_path):
    img = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(64, 48)
    atomic_write_png(tmp_path / "x.png", img)
    assert np.array_equal(read_gray(tmp_path / "x.png"), img)
    with pytest.raises(InputError, match=r"nope.png: image file not found"):
        read_gray(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    with pytest.raises(InputError, match=r"bad.png: cannot decode"):
        read_gray(tmp_path / "bad.png")
