"""The mask writer of ``infer``: palette PNGs written by :func:`fcn_deploy.infer.outputs.write_palette_png`
(stdlib zlib, not PIL), read back by PIL exactly as PIL's own writer's."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcn_deploy.infer import outputs
from fcn_deploy.infer.outputs import palette, write_mask, write_palette_png
from fcn_deploy.voc import voc_palette


def _read(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _png(labels, pal) -> bytes:
    buf = io.BytesIO()
    write_palette_png(buf, labels, pal)
    return buf.getvalue()


@pytest.mark.parametrize("shape", [(1, 1), (1, 700), (700, 1), (375, 500), (37, 3001)])
def test_pil_reads_back_the_values_and_the_palette(shape):
    rng = np.random.default_rng(sum(shape))
    labels = rng.integers(0, 256, shape, dtype=np.uint8)
    pal = palette([(1, 2, 3), (250, 251, 252)])
    data = _png(labels, pal)
    img = _read(data)
    assert img.mode == "P" and img.size == shape[::-1]
    np.testing.assert_array_equal(np.asarray(img), labels)
    assert img.getpalette() == pal
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure


def test_the_same_pixels_as_pil_writes():
    labels = np.kron(np.random.default_rng(1).integers(0, 21, (12, 16)).astype(np.uint8),
                     np.ones((32, 32), np.uint8))[:375, :500]
    pal = palette()
    ours = _read(_png(labels, pal))
    ref = Image.fromarray(labels)
    ref.putpalette(pal)
    buf = io.BytesIO()
    ref.save(buf, format="PNG", compress_level=1)
    theirs = _read(buf.getvalue())
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert ours.getpalette() == theirs.getpalette()


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, i = [], 8
    while i < len(data):
        n = int.from_bytes(data[i: i + 4], "big")
        kind, body = data[i + 4: i + 8], data[i + 8: i + 8 + n]
        assert int.from_bytes(data[i + 8 + n: i + 12 + n], "big") == zlib.crc32(kind + body)
        out.append((kind, body))
        i += 12 + n
    return out


def test_blocks_bound_the_copy_and_still_make_one_image(monkeypatch):
    """Rows go to zlib in blocks of PNG_BLOCK_BYTES (several IDAT chunks), each row starting with
    filter type 0; the header says 8-bit palette, no interlace."""
    monkeypatch.setattr(outputs, "PNG_BLOCK_BYTES", 64)
    labels = np.random.default_rng(2).integers(0, 256, (50, 30), dtype=np.uint8)
    data = _png(labels, palette())
    chunks = _chunks(data)
    kinds = [k for k, _ in chunks]
    assert kinds[:2] == [b"IHDR", b"PLTE"] and kinds[-1] == b"IEND" and kinds.count(b"IDAT") >= 2
    assert set(kinds[2:-1]) == {b"IDAT"}
    assert chunks[0][1] == (30).to_bytes(4, "big") + (50).to_bytes(4, "big") + bytes([8, 3, 0, 0, 0])
    assert chunks[1][1] == bytes(palette())
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(50, 31)
    assert (rows[:, 0] == 0).all()
    np.testing.assert_array_equal(rows[:, 1:], labels)
    np.testing.assert_array_equal(np.asarray(_read(data)), labels)


def test_a_short_palette_and_level(monkeypatch):
    """A palette of two colours is written as two; ``level`` reaches zlib (default 1)."""
    seen = []
    real = zlib.compressobj
    monkeypatch.setattr(outputs.zlib, "compressobj", lambda level: seen.append(level) or real(level))
    labels = np.array([[0, 1], [1, 0]], np.uint8)
    buf = io.BytesIO()
    write_palette_png(buf, labels, [9, 8, 7, 6, 5, 4], level=9)
    img = _read(buf.getvalue())
    assert img.getpalette()[:6] == [9, 8, 7, 6, 5, 4]
    assert dict(_chunks(buf.getvalue()))[b"PLTE"] == bytes([9, 8, 7, 6, 5, 4])
    np.testing.assert_array_equal(np.asarray(img), labels)
    _png(labels, palette())
    assert seen == [9, 1]


@pytest.mark.parametrize("labels, pal, message", [
    (np.zeros((2, 2, 1), np.uint8), palette(), "non-empty \\(H, W\\) uint8"),
    (np.zeros((2, 2), np.int64), palette(), "non-empty \\(H, W\\) uint8"),
    (np.zeros((0, 5), np.uint8), palette(), "non-empty \\(H, W\\) uint8"),
    (np.zeros((5, 0), np.uint8), palette(), "non-empty \\(H, W\\) uint8"),
    (np.zeros((2, 2), np.uint8), [], "1 to 256 RGB triples, got 0"),
    (np.zeros((2, 2), np.uint8), [0] * 769, "1 to 256 RGB triples, got 769"),
    (np.zeros((2, 2), np.uint8), [0] * 771, "1 to 256 RGB triples, got 771"),
    (np.zeros((2, 2), np.uint8), [0] * 4, "1 to 256 RGB triples, got 4"),
])
def test_refuses_what_is_no_palette_png(labels, pal, message):
    buf = io.BytesIO()
    with pytest.raises(ValueError, match=message):
        write_palette_png(buf, labels, pal)
    assert buf.getvalue() == b""


def test_write_mask_writes_atomically(tmp_path):
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_mask(tmp_path / "m.png", labels, palette())
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.png")), labels)
    with pytest.raises(ValueError):
        write_mask(tmp_path / "m.png", labels.astype(np.float32), palette())
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]  # the old mask kept, no temporary left
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.png")), labels)


def test_chunks_are_length_type_data_crc():
    data = _png(np.zeros((3, 5), np.uint8), palette())
    chunks = _chunks(data)  # checks each length and CRC
    assert chunks[-1] == (b"IEND", b"")
    assert outputs._png_chunk(b"tEXt", b"ab") == b"\x00\x00\x00\x02tEXtab" + zlib.crc32(b"tEXtab").to_bytes(4, "big")


@pytest.mark.parametrize("block, width, rows", [(64, 31, 2), (64, 30, 2), (64, 62, 1), (1, 5, 1), (10**6, 7, 51)])
def test_rows_per_block(monkeypatch, block, width, rows):
    """Each zlib call gets whole filtered rows, PNG_BLOCK_BYTES // (W + 1) of them (at least one),
    the last block the rest: 51 rows of ``width`` pixels."""
    monkeypatch.setattr(outputs, "PNG_BLOCK_BYTES", block)
    sizes = []
    real = zlib.compressobj

    class Recording:
        def __init__(self, level):
            self.z = real(level)

        def compress(self, data):
            sizes.append(memoryview(data).nbytes)
            return self.z.compress(data)

        def flush(self):
            return self.z.flush()

    monkeypatch.setattr(outputs.zlib, "compressobj", Recording)
    labels = np.random.default_rng(3).integers(0, 21, (51, width), dtype=np.uint8)
    data = _png(labels, palette())
    full, rest = divmod(51, rows)
    assert sizes == [rows * (width + 1)] * full + ([rest * (width + 1)] if rest else [])
    np.testing.assert_array_equal(np.asarray(_read(data)), labels)


def test_palette_puts_the_colormap_first():
    pal = palette([(1, 2, 3), (4.0, 5, 6)])
    assert len(pal) == 768 and pal[:6] == [1, 2, 3, 4, 5, 6]
    assert pal[6:] == voc_palette()[6:]
    assert palette() == palette(None) == voc_palette()


def test_output_path_appends_the_suffix_below_the_folder():
    assert outputs.output_path("out", "a/b.c", ".png") == Path("out/a/b.c.png")
    assert outputs.output_path(Path("/o"), Path("x"), ".logits.npy") == Path("/o/x.logits.npy")


def test_overlay_leaves_background_as_the_photo_and_lays_colours_over_the_rest(tmp_path):
    """Issue 24 (pictures): the overlay blended background with black (the photo halved in
    brightness). Background (class 0) keeps the photo's pixels; other classes get their colour
    at OVERLAY_ALPHA over the photo."""
    rgb = np.array([[[0, 0, 0], [200, 100, 50], [255, 255, 255], [10, 21, 31], [90, 90, 90]]], np.uint8)
    labels = np.array([[0, 0, 1, 7, 2]], np.uint8)
    colormap = [(100, 200, 255), (255, 255, 255), (0, 0, 200)]
    out = outputs.overlay_image(rgb, labels, colormap)
    assert out.dtype == np.uint8 and outputs.OVERLAY_ALPHA == 0.5
    np.testing.assert_array_equal(out, [[[0, 0, 0], [200, 100, 50], [255, 255, 255], [5, 10, 16], [45, 45, 145]]])
    flat = np.full((16, 16, 3), (10, 21, 31), np.uint8)  # one colour: JPEG keeps it to a level or two
    labels = np.zeros((16, 16), np.uint8)
    labels[:, 8:] = 2
    outputs.write_overlay(tmp_path / "o.jpg", flat, labels, colormap)
    img = Image.open(tmp_path / "o.jpg")
    assert img.format == "JPEG" and img.size == (16, 16)
    assert [p.name for p in tmp_path.iterdir()] == ["o.jpg"]
    np.testing.assert_allclose(np.asarray(img, np.float32)[:, :6], np.full((16, 6, 3), (10, 21, 31)), atol=3)
    np.testing.assert_allclose(np.asarray(img, np.float32)[:, 10:], np.full((16, 6, 3), (5, 10, 116)), atol=4)
    ref = io.BytesIO()
    Image.fromarray(outputs.overlay_image(flat, labels, colormap)).save(ref, "JPEG", quality=90)
    assert (tmp_path / "o.jpg").read_bytes() == ref.getvalue()  # quality 90


def test_allocate_reserves_the_bytes(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    outputs.allocate(path, 3 << 20)
    assert path.stat().st_size == 3 << 20 and path.read_bytes()[:3] == b"abc"
    assert path.stat().st_blocks * 512 >= 3 << 20  # blocks, not a sparse file


@pytest.mark.parametrize("how", ["unsupported", "absent"])
def test_allocate_writes_zeros_without_fallocate(tmp_path, monkeypatch, how):
    """Where posix_fallocate is missing or the file system refuses it (EOPNOTSUPP), zeros are
    written after what the file holds, in 1 MiB chunks, up to the size."""
    import errno
    import os

    if how == "absent":
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    else:
        def refuse(fd, offset, size):
            raise OSError(errno.EOPNOTSUPP, "not supported")
        monkeypatch.setattr(os, "posix_fallocate", refuse)
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))
    path = tmp_path / "f"
    path.write_bytes(b"xyz")
    size = (2 << 20) + 10
    outputs.allocate(path, size)
    data = path.read_bytes()
    assert len(data) == size and data[:3] == b"xyz" and data[3:] == bytes(size - 3)
    assert writes == [1 << 20, 1 << 20, 7]


def test_allocate_passes_on_other_errors(tmp_path, monkeypatch):
    import errno
    import os

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    path = tmp_path / "f"
    path.write_bytes(b"")
    with pytest.raises(OSError) as info:
        outputs.allocate(path, 100)
    assert info.value.errno == errno.ENOSPC and path.stat().st_size == 0


def test_logits_memmap_is_an_npy_file_written_on_success(tmp_path):
    path = tmp_path / "x.logits.npy"
    with outputs.logits_memmap(path, (2, 3, 4)) as arr:
        assert arr.shape == (2, 3, 4) and arr.dtype == np.float16
        assert not path.exists()  # a temporary until the block ends
        arr[:] = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    np.testing.assert_array_equal(np.load(path), np.arange(24, dtype=np.float16).reshape(2, 3, 4))
    with pytest.raises(RuntimeError), outputs.logits_memmap(tmp_path / "y.logits.npy", (1, 2, 2)) as arr:
        arr[:] = 1
        raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.logits.npy"]
