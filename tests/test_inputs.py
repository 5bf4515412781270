"""Input discovery of ``infer`` (:mod:`fcn_deploy.infer.inputs`): which files of a folder are images,
their output stems, the output folder kept out, outputs that would replace an input refused,
and the output folder checked before any work."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcn_deploy.errors import FcnDeployError
from fcn_deploy.infer.inputs import (InputImage, _is_image_candidate, check_output_dir, collect_inputs, find_images,
                                     list_inputs, refuse_overwriting_inputs)


def _png(path, h=4, w=5, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format="PNG")
    return path




def _rels(images):
    return [(item.path.name, item.rel_stem.as_posix()) for item in images]


# -- which files are images --------------------------------------------------------------------
def test_an_image_extension_is_enough_in_any_case(tmp_path):
    for name in ("broken.jpg", "BROKEN.JPG", "b.Png", "c.tiff", "d.webp"):
        (tmp_path / name).write_bytes(b"not really an image")  # reported when decoded, never ignored
        assert _is_image_candidate(tmp_path / name), name


def test_formats_pil_only_writes_are_no_image_extensions(tmp_path):
    """A ``report.pdf`` among the photos is not an image PIL can read: ignored, not a failure."""
    rgb = np.zeros((4, 4, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "report.pdf")  # PIL writes PDF, cannot open it
    (tmp_path / "x.PALM").write_bytes(b"\0" * 64)
    assert not _is_image_candidate(tmp_path / "report.pdf") and not _is_image_candidate(tmp_path / "x.PALM")
    (tmp_path / "broken.mpo").write_bytes(b"torn")  # MPO: opened by PIL's JPEG plugin, so reported when broken
    assert _is_image_candidate(tmp_path / "broken.mpo")
    _png(tmp_path / "photo.png")
    assert [i.path.name for i in collect_inputs([tmp_path])[0]] == ["broken.mpo", "photo.png"]


def test_other_names_are_opened_to_recognise_an_image(tmp_path, bomb_png):
    assert _is_image_candidate(_png(tmp_path / "no_extension"))
    assert _is_image_candidate(_png(tmp_path / "photo.backup"))
    assert _is_image_candidate(bomb_png(tmp_path / "bomb", 30000, 30000))  # refused by name later
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "torn").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0")  # PIL: OSError, truncated
    (tmp_path / "bad.ppm.txt").write_bytes(b"P6\n25F 16\n255\n" + b"\0" * 30)  # PIL: ValueError
    for name in ("notes.txt", "empty", "torn", "bad.ppm.txt", "missing"):
        assert not _is_image_candidate(tmp_path / name), name


# -- collect_inputs ----------------------------------------------------------------------------
def test_a_tree_is_walked_in_order_mirroring_its_folders(tmp_path):
    root = tmp_path / "in"
    for rel in ("b.png", "a.png", "sub/z.png", "sub/deeper/y.jpg", "Sub2/x.png", "noext"):
        _png(root / rel)
    (root / "notes.txt").write_text("skip me")
    _png(root / ".hidden.png")
    _png(root / ".cache" / "c.png")
    images, failed = collect_inputs([root])
    assert failed == []
    assert _rels(images) == [("a.png", "a"), ("b.png", "b"), ("noext", "noext"), ("x.png", "Sub2/x"),
                             ("z.png", "sub/z"), ("y.jpg", "sub/deeper/y")]
    assert all(isinstance(i, InputImage) and i.path.is_file() for i in images)
    assert images[0].path == root / "a.png"
    assert find_images([root]) == [i.path for i in images]


def test_a_file_argument_keeps_its_name_and_is_never_filtered(tmp_path):
    notes = tmp_path / "deep" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("explicitly named: it fails to decode, by name")
    hidden = _png(tmp_path / "deep" / ".hidden.png")
    images, failed = collect_inputs([notes, str(hidden)])
    assert failed == [] and _rels(images) == [("notes.txt", "notes"), (".hidden.png", ".hidden")]
    assert images[1].path == hidden


def test_each_file_is_listed_once(tmp_path):
    a = _png(tmp_path / "in" / "a.png")
    os.symlink(a, tmp_path / "in" / "link.png")  # the same file under another name
    images, failed = collect_inputs([a, tmp_path / "in", tmp_path / "in" / "." / "a.png"])
    assert failed == [] and [i.path for i in images] == [a]


def test_collect_inputs_counts_a_file_once_through_symlinks(tmp_path):
    """A symlink to an image already found, a folder and a file of it both named, and a
    symlinked folder (followed, but its target walked once, under its own name) give each image
    once; outputs mirror the tree."""
    src = tmp_path / "in"
    for rel in ("a.png", "sub/c.png"):
        _png(src / rel)
    (src / "b.png").symlink_to(src / "a.png")
    (src / "link").symlink_to(src / "sub", target_is_directory=True)
    (tmp_path / "elsewhere.png").symlink_to(src / "sub" / "c.png")
    images, failed = collect_inputs([src, src / "a.png", tmp_path / "elsewhere.png"])
    assert not failed
    assert [(i.path.relative_to(tmp_path).as_posix(), i.rel_stem.as_posix()) for i in images] == [
        ("in/a.png", "a"), ("in/sub/c.png", "sub/c")]


def test_the_output_folder_inside_an_input_folder_is_skipped(tmp_path, monkeypatch):
    root = tmp_path / "in"
    _png(root / "a.png")
    _png(root / "masks" / "a.png")  # an earlier run's output
    _png(root / "masks2" / "b.png")
    assert _rels(collect_inputs([root], exclude=root / "masks")[0]) == [("a.png", "a"), ("b.png", "masks2/b")]
    monkeypatch.chdir(tmp_path)  # a relative exclude is the same folder
    assert _rels(collect_inputs([root], exclude="in/masks")[0]) == [("a.png", "a"), ("b.png", "masks2/b")]
    assert len(collect_inputs([root])[0]) == 3


def test_missing_paths_and_fifos_are_failures_by_name(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    good = _png(tmp_path / "ok.png")
    images, failed = collect_inputs([tmp_path / "nope.png", fifo, good])
    assert [i.path for i in images] == [good]
    assert failed == [(str(tmp_path / "nope.png"), f"{tmp_path / 'nope.png'}: no such file or folder"),
                      (str(fifo), f"{fifo}: not a regular file (a FIFO, socket or device), not an image")]
    assert find_images([tmp_path / "nope.png", good]) == [good]


def test_names_differing_in_case_are_distinct_on_a_case_sensitive_file_system(tmp_path):
    """Issue 24 (9): ``a.jpg`` beside ``A.JPG`` failed one of them as a clash, though both masks
    (``a.png``, ``A.png``) can live side by side; they clash only where case is ignored."""
    root = tmp_path / "in"
    for rel in ("A.JPG", "a.jpg", "b.png", "sub/c.png", "d.tar.png"):
        _png(root / rel)
    images, failed = collect_inputs([root])
    assert failed == []
    assert sorted(i.rel_stem.as_posix() for i in images) == ["A", "a", "b", "d.tar", "sub/c"]
    images, failed = collect_inputs([root], case_insensitive=True)  # e.g. an output on a USB stick
    assert sorted(os.path.basename(p) for p, _ in failed) == ["A.JPG", "a.jpg"]
    assert all("ignores case" in m and "also that of" in m for _, m in failed)


def test_a_name_depends_on_its_path_and_root_only(tmp_path):
    """Issue 24 (9): ``infer camA camB`` named camA's photo ``IMG_0001.JPG.png`` and ``infer camA``
    ``IMG_0001.png``: the name must not depend on the other inputs given."""
    cam_a, cam_b = _png(tmp_path / "camA" / "IMG_0001.JPG"), _png(tmp_path / "camB" / "IMG_0001.PNG", seed=1)
    _png(tmp_path / "camB" / "IMG_0002.JPG", seed=2)
    alone = {i.path: i.rel_stem for i in collect_inputs([tmp_path / "camA"])[0]}
    images, failed = collect_inputs([tmp_path / "camA", tmp_path / "camB"])
    assert alone == {cam_a: Path("IMG_0001")}
    # the same name from two folders given together: both fail, neither owns IMG_0001.png
    assert [i.rel_stem for i in images] == [Path("IMG_0002")]
    assert failed == [
        (str(cam_a), f"{cam_a}: its output name IMG_0001.png is also that of {cam_b}; give each input folder its own -o"),
        (str(cam_b), f"{cam_b}: its output name IMG_0001.png is also that of {cam_a}; give each input folder its own -o")]
    assert collect_inputs([tmp_path / "camA"])[0] == collect_inputs([tmp_path / "camA"])[0]  # deterministic


def test_a_stem_shared_in_a_folder_fails_all_and_keep_extension_names_them_all(tmp_path):
    root = tmp_path / "in"
    jpg, png = _png(root / "a.jpg"), _png(root / "a.png", seed=1)
    _png(root / "b.png")
    images, failed = collect_inputs([root])
    assert [i.rel_stem for i in images] == [Path("b")]
    assert [p for p, _ in failed] == [str(jpg), str(png)]
    assert failed[0][1] == (f"{jpg}: its output name a.png is also that of {png}; rename one, or pass "
                            f"--keep-extension (masks named <name>.<ext>.png)")
    images, failed = collect_inputs([root], keep_extension=True)
    assert failed == [] and [i.rel_stem for i in images] == [Path("a.jpg"), Path("a.png"), Path("b.png")]
    assert find_images([root]) == [jpg, png, root / "b.png"]  # listing images needs no names


def test_an_output_file_named_like_an_output_folder_fails(tmp_path):
    root = tmp_path / "in"
    clash = _png(root / "x.jpg")  # its overlay x.overlay.jpg ...
    _png(root / "x.overlay.jpg" / "p.png")  # ... is the name of the output folder of this one
    listing = list_inputs([root], suffixes=(".png", ".overlay.jpg"))
    assert [i.rel_stem.as_posix() for i in listing.images] == ["x.overlay.jpg/p"]
    assert listing.failed == [(str(clash), f"{clash}: its output x.overlay.jpg has the name of an output folder; "
                                           f"rename it")]


# -- refuse_overwriting_inputs -----------------------------------------------------------------
def test_an_output_that_is_an_input_is_refused_and_the_rest_kept(tmp_path):
    photo = _png(tmp_path / "p" / "photo.png")
    other = _png(tmp_path / "p" / "other.jpg")
    items = collect_inputs([tmp_path / "p"])[0]
    kept, failed = refuse_overwriting_inputs(items, tmp_path / "p", [".png", ".overlay.jpg"])
    assert [i.path for i in kept] == [other]
    assert failed == [(str(photo), f"{photo}: its output {tmp_path / 'p' / 'photo.png'} would replace the input "
                                   f"{photo}; choose another output folder (-o)")]


def test_a_link_to_an_input_is_refused_once_and_other_files_are_not_inputs(tmp_path):
    photo = _png(tmp_path / "in" / "a.jpg")
    out = tmp_path / "out"
    out.mkdir()
    os.link(photo, out / "a.overlay.jpg")  # writing the overlay would write through it
    os.symlink(photo, out / "a.logits.npy")
    _png(out / "a.png", seed=1)  # an earlier mask: no input, overwritten as usual
    items = [InputImage(photo, Path("a")), InputImage(tmp_path / "gone.jpg", Path("gone"))]
    kept, failed = refuse_overwriting_inputs(items, out, [".png", ".overlay.jpg", ".logits.npy"])
    assert [i.path for i in kept] == [tmp_path / "gone.jpg"]  # a vanished input: no output is it
    assert len(failed) == 1 and failed[0][0] == str(photo)
    assert f"its output {out / 'a.overlay.jpg'} would replace the input {photo}" in failed[0][1]
    kept, failed = refuse_overwriting_inputs(items, out, [".png"])
    assert failed == [] and [i.path for i in kept] == [photo, tmp_path / "gone.jpg"]
    kept, failed = refuse_overwriting_inputs(items, out, [".logits.npy"])
    assert [p for p, _ in failed] == [str(photo)] and f"{out / 'a.logits.npy'}" in failed[0][1]
    for fresh in (tmp_path / "new", photo):  # no folder there (yet): no output can be an input
        kept, failed = refuse_overwriting_inputs(items, fresh, [".png", ".overlay.jpg", ".logits.npy"])
        assert failed == [] and kept == items


# -- check_output_dir --------------------------------------------------------------------------
def test_check_output_dir_creates_and_proves_writable(tmp_path):
    out = check_output_dir(tmp_path / "a" / "b")
    assert out == tmp_path / "a" / "b" and out.is_dir() and list(out.iterdir()) == []
    assert check_output_dir(str(out)) == out  # an existing folder


def test_check_output_dir_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FcnDeployError) as exc:
        check_output_dir(tmp_path / "file" / "out")
    assert str(exc.value) == f"output folder {tmp_path / 'file' / 'out'} is not writable: Not a directory"
    with pytest.raises(FcnDeployError) as exc:
        check_output_dir(tmp_path / "file" / "out", create=False)
    assert str(exc.value) == f"output folder {tmp_path / 'file' / 'out'} is not writable: {tmp_path / 'file'} is not a folder"
    with pytest.raises(FcnDeployError) as exc:
        check_output_dir(tmp_path / "file", create=False)
    assert str(exc.value).endswith(f"{tmp_path / 'file'} is not a folder")


def test_check_output_dir_without_create_leaves_nothing_behind(tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "c"
    assert check_output_dir(out, create=False) == out and list(tmp_path.iterdir()) == []
    assert check_output_dir(tmp_path, create=False) == tmp_path
    monkeypatch.chdir(tmp_path)
    assert check_output_dir("new/deeper", create=False) == Path("new/deeper")  # up to the working folder
    assert list(tmp_path.iterdir()) == []


def _unwritable_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder
    folder = Path("/proc/sys")  # as root only a read-only file system refuses writes
    if folder.is_dir() and not os.access(folder, os.W_OK):
        return folder
    pytest.skip("no folder this user cannot write to")


def test_check_output_dir_in_a_read_only_folder(tmp_path):
    ro = _unwritable_folder(tmp_path)
    try:
        with pytest.raises(FcnDeployError) as exc:
            check_output_dir(ro / "out", create=False)
        assert str(exc.value) == f"output folder {ro / 'out'} is not writable: {ro} is not writable"
        with pytest.raises(FcnDeployError, match=f"output folder {ro / 'out'} is not writable: "):
            check_output_dir(ro / "out")
        assert not (ro / "out").exists()
        with pytest.raises(FcnDeployError) as exc:  # it exists: the test file cannot be made in it
            check_output_dir(ro)
        assert str(exc.value).startswith(f"output folder {ro} is not writable: ") and "\n" not in str(exc.value)
    finally:
        (tmp_path / "ro").chmod(0o755)
