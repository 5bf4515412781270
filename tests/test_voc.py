"""VOC-format reader, synthetic writer and the training dataset."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from fcn_deploy.errors import ArtifactExistsError, DatasetError, ImageReadError, UsageError
from fcn_deploy.voc import (IGNORE_INDEX, SYNTH_CLASSES, SYNTH_SIZES, VOC_COLORMAP, VOID_COLOR,
                            colormap_array,
                            VOCSample, VOCSegDataset, image_hw, list_split, read_label, read_sample,
                            resolve_voc_root, voc_palette, write_synthetic_voc)


def _sizes(voc_root, split):
    return [image_hw(s.image_path) for s in list_split(voc_root, split)]


def test_synthetic_round_trip(voc_root):
    train, val = list_split(voc_root, "train"), list_split(voc_root, "val")
    trainval = list_split(voc_root, "trainval")
    assert len(train) == 9 and len(val) == 3
    assert {s.name for s in train}.isdisjoint({s.name for s in val})
    assert sorted(s.name for s in trainval) == sorted(s.name for s in train + val)
    jpgs = sorted(p.stem for p in (voc_root / "JPEGImages").glob("*.jpg"))
    pngs = sorted(p.stem for p in (voc_root / "SegmentationClass").glob("*.png"))
    assert jpgs == pngs == sorted(s.name for s in trainval)
    seen = set()
    for s in trainval:
        rgb, label = read_sample(s)
        assert rgb.dtype == np.uint8 and rgb.shape == (*label.shape, 3)
        assert label.dtype == np.uint8
        values = set(np.unique(label).tolist())
        assert {0, IGNORE_INDEX} <= values and values <= {0, IGNORE_INDEX, *SYNTH_CLASSES}
        assert (label == IGNORE_INDEX).mean() < 0.2  # void is a thin border band
        seen |= values
        with Image.open(s.label_path) as png:
            assert png.mode == "P" and png.getpalette()[: 3 * 256] == voc_palette()
    assert len(seen - {0, IGNORE_INDEX}) >= 4  # several object classes


def test_synthetic_sizes_are_varied(voc_root):
    sizes = _sizes(voc_root, "trainval")
    assert (320, 480) in sizes  # exactly the tile
    assert any(h < 320 and w < 480 for h, w in sizes)  # smaller
    assert any(h > 320 and w > 480 for h, w in sizes)  # larger
    assert any(h > w for h, w in sizes)  # portrait
    assert any(h % 2 and w % 2 for h, w in sizes)  # odd
    train = _sizes(voc_root, "train")
    assert sum(h >= 320 and w >= 480 for h, w in train) > len(train) / 2
    assert len(set(_sizes(voc_root, "val"))) == 3


def test_synthetic_void_band_surrounds_objects(voc_root):
    label = read_label(list_split(voc_root, "train")[0].label_path)
    obj = (label != 0) & (label != IGNORE_INDEX)
    bg = label == 0
    # an object pixel never touches a background pixel: the void band separates them
    assert not (obj[:, 1:] & bg[:, :-1]).any() and not (obj[:, :-1] & bg[:, 1:]).any()
    assert not (obj[1:] & bg[:-1]).any() and not (obj[:-1] & bg[1:]).any()


def test_synthetic_is_deterministic_and_fast(tmp_path, voc_root):
    start = time.perf_counter()
    again = write_synthetic_voc(tmp_path / "a", num_images=12, seed=0)
    assert time.perf_counter() - start < 4.0  # ~0.6 s on 2 idle cores
    for s in list_split(voc_root, "trainval"):
        assert (again / "JPEGImages" / f"{s.name}.jpg").read_bytes() == s.image_path.read_bytes()
        assert (again / "SegmentationClass" / f"{s.name}.png").read_bytes() == s.label_path.read_bytes()
    other = write_synthetic_voc(tmp_path / "b", num_images=12, seed=1)
    assert (other / "SegmentationClass" / "synth_00000.png").read_bytes() != \
        (again / "SegmentationClass" / "synth_00000.png").read_bytes()


def test_synthetic_refuses_overwrite_and_bad_args(tmp_path):
    write_synthetic_voc(tmp_path, num_images=2)
    with pytest.raises(ArtifactExistsError, match="--force"):
        write_synthetic_voc(tmp_path, num_images=2)
    voc = write_synthetic_voc(tmp_path, num_images=3, force=True)
    assert len(list_split(voc, "train")) == 2 and len(list_split(voc, "val")) == 1
    with pytest.raises(UsageError, match="--num-images"):
        write_synthetic_voc(tmp_path / "c", num_images=1)
    with pytest.raises(UsageError, match="val_fraction"):
        write_synthetic_voc(tmp_path / "c", num_images=4, val_fraction=1.0)


def test_root_resolution(voc_root):
    assert resolve_voc_root(voc_root.parent.parent) == voc_root  # the folder synth-voc got
    assert resolve_voc_root(voc_root) == voc_root


def test_rgb_label_mapped_through_colormap(tmp_path):
    rgb = np.zeros((2, 4, 3), np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[0, 2] = VOC_COLORMAP[15], VOC_COLORMAP[20], VOID_COLOR
    rgb[0, 3] = (1, 2, 3)  # not a VOC colour
    rgb[1, :] = VOC_COLORMAP[1]
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb, "RGB").save(path)
    assert read_label(path).tolist() == [[15, 20, 255, 255], [1, 1, 1, 1]]
    Image.fromarray(np.dstack([rgb, np.full((2, 4), 255, np.uint8)]), "RGBA").save(path)
    assert read_label(path).tolist() == [[15, 20, 255, 255], [1, 1, 1, 1]]


def test_palette_and_gray_labels_read_as_indices(tmp_path):
    ids = np.array([[0, 3, 255], [21, 7, 0]], np.uint8)
    png = Image.fromarray(ids, "P")
    png.putpalette(voc_palette())
    png.save(tmp_path / "p.png")
    Image.fromarray(ids, "L").save(tmp_path / "l.png")
    assert np.array_equal(read_label(tmp_path / "p.png"), ids)
    assert np.array_equal(read_label(tmp_path / "l.png"), ids)


# --- bad input ----------------------------------------------------------------------------------

@pytest.fixture()
def small_voc(tmp_path):
    return write_synthetic_voc(tmp_path, num_images=4, seed=3)


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="nowhere"):
        list_split(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty is not a VOC2012 folder"):
        list_split(tmp_path / "empty", "train")


def test_missing_split_file(small_voc):
    with pytest.raises(DatasetError, match="test.txt"):
        list_split(small_voc, "test")
    (small_voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(DatasetError, match="lists no images"):
        list_split(small_voc, "val")


def test_image_without_label(small_voc):
    (small_voc / "SegmentationClass" / "synth_00001.png").unlink()
    with pytest.raises(DatasetError, match="synth_00001.jpg has no label: .*synth_00001.png"):
        list_split(small_voc, "train")


def test_listed_image_missing(small_voc):
    (small_voc / "JPEGImages" / "synth_00000.jpg").unlink()
    with pytest.raises(DatasetError, match="synth_00000.jpg"):
        list_split(small_voc, "train")


def test_label_size_mismatch(small_voc):
    label = small_voc / "SegmentationClass" / "synth_00000.png"
    Image.fromarray(np.zeros((10, 12), np.uint8), "P").save(label)
    sample = list_split(small_voc, "train")[0]
    with pytest.raises(DatasetError) as exc:
        read_sample(sample)
    msg = str(exc.value)
    assert "synth_00000.png" in msg and "synth_00000.jpg" in msg and "10x12" in msg
    assert msg.endswith("synth_00000.jpg is 320x480 (HxW)")  # the image's own size, height first


def test_unreadable_jpeg(small_voc):
    bad = small_voc / "JPEGImages" / "synth_00001.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageReadError, match="synth_00001.jpg"):
        read_sample(VOCSample("synth_00001", bad, small_voc / "SegmentationClass" / "synth_00001.png"))
    with pytest.raises(ImageReadError, match="synth_00001.jpg"):
        VOCSegDataset(small_voc, "train", (64, 96))  # the size probe reports it too


def test_unreadable_label(small_voc):
    bad = small_voc / "SegmentationClass" / "synth_00000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match="synth_00000.png"):
        read_label(bad)


# --- the training dataset ------------------------------------------------------------------------

def test_dataset_filters_small_images_like_the_chapter(voc_root):
    sizes = _sizes(voc_root, "train")
    ds = VOCSegDataset(voc_root, "train")
    usable = sum(h >= 320 and w >= 480 for h, w in sizes)
    assert len(ds) == usable and ds.num_filtered == len(sizes) - usable > 0
    x, y = ds[0]
    assert x.shape == (3, 320, 480) and x.dtype == torch.float32
    assert y.shape == (320, 480) and y.dtype == torch.int64
    assert -2.2 < float(x.min()) and float(x.max()) < 2.7  # ImageNet-normalised


def test_dataset_whole_images(voc_root):
    ds = VOCSegDataset(voc_root, "val", crop_hw=None)
    assert ds.num_filtered == 0 and len(ds) == 3
    for i, s in enumerate(ds.samples):
        x, y = ds[i]
        assert tuple(x.shape[1:]) == tuple(y.shape) == image_hw(s.image_path)


def test_dataset_crop_is_the_same_for_image_and_label(tmp_path):
    """Stripes of pure colours whose label is the stripe index: every crop must keep them aligned."""
    voc = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    colours = np.array([VOC_COLORMAP[c] for c in (1, 2, 3, 4, 5, 6)], np.uint8) // 128 * 200 + 40
    label = np.repeat(np.arange(6, dtype=np.uint8)[None, :], 16, axis=1).repeat(70, axis=0)  # 70x96
    Image.fromarray(colours[label], "RGB").save(voc / "JPEGImages" / "a.jpg", quality=100, subsampling=0)
    Image.fromarray(label, "L").save(voc / "SegmentationClass" / "a.png")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    ds = VOCSegDataset(voc, "train", (32, 64))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.manual_seed(0)
    lefts = set()
    for _ in range(20):
        x, y = ds[0]
        rgb = (x.permute(1, 2, 0) * std + mean) * 255
        expected = torch.from_numpy(colours.astype(np.float32))[y]
        inner = torch.zeros_like(y, dtype=torch.bool)  # skip JPEG ringing near stripe edges
        inner[:, 2:-2] = (y[:, 2:-2] == y[:, :-4]) & (y[:, 2:-2] == y[:, 4:])
        assert (rgb - expected)[inner].abs().max() < 25
        lefts.add(int(y[0, 0]) * 16 - int((y[0] == y[0, 0]).sum()))
    assert len(lefts) > 3  # the crops really move


def test_dataset_maps_unknown_ids_to_ignore(tmp_path):
    voc = write_synthetic_voc(tmp_path, num_images=2)
    s = list_split(voc, "train")[0]
    label = read_label(s.label_path)
    label[:5, :5] = 40
    Image.fromarray(label, "L").save(s.label_path)
    _, y = VOCSegDataset(voc, "train", None)[0]
    assert (y[:5, :5] == IGNORE_INDEX).all()


def test_no_image_as_large_as_the_crop(voc_root):
    with pytest.raises(DatasetError, match=r"crop 1024x1024 .*9 images are at most 500 high and 560 wide"):
        VOCSegDataset(voc_root, "train", (1024, 1024))


def test_sizes_cycle_through_all_synthetic_sizes(voc_root):
    assert set(_sizes(voc_root, "trainval")) == set(SYNTH_SIZES)


# --- contracts and boundaries (found by mutation testing, docs/testing.md) ----------------------

def test_palette_classes_void_colour_and_black_rest():
    pal = voc_palette()
    assert len(pal) == 768
    for i, rgb in enumerate(VOC_COLORMAP):
        assert tuple(pal[3 * i: 3 * i + 3]) == rgb
    assert tuple(pal[3 * 255:]) == VOID_COLOR == (224, 224, 192)  # VOC's void colour
    assert not any(pal[3 * len(VOC_COLORMAP): 3 * 255])  # unused ids are black
    cmap = colormap_array()
    assert cmap.dtype == np.uint8 and cmap.shape == (21, 3) and tuple(cmap[15]) == (192, 128, 128)
    assert colormap_array([(1, 2, 3)]).tolist() == [[1, 2, 3]]


def test_rgb_colours_one_step_off_a_class_colour_are_void(tmp_path):
    rgb = np.array([[VOC_COLORMAP[0], (0, 0, 1), (129, 0, 0), (128, 1, 0), VOC_COLORMAP[4]]], np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "l.png")
    assert read_label(tmp_path / "l.png").tolist() == [[0, 255, 255, 255, 4]]


def test_label_ids_from_num_classes_up_become_ignore(tmp_path):
    """Ids 0..num_classes-1 and 255 are kept; num_classes (21) itself is not a class."""
    voc = write_synthetic_voc(tmp_path, num_images=2)
    s = list_split(voc, "train")[0]
    label = read_label(s.label_path)
    label[0, :4] = (20, 21, 22, 255)
    Image.fromarray(label, "L").save(s.label_path)
    _, y = VOCSegDataset(voc, "train", None)[0]
    assert y[0, :4].tolist() == [20, 255, 255, 255]
    _, y = VOCSegDataset(voc, "train", None, num_classes=21 - 1)[0]
    assert y[0, :4].tolist() == [255, 255, 255, 255]


def test_image_exactly_the_crop_size_is_kept_and_cropped_whole(tmp_path):
    voc = write_synthetic_voc(tmp_path, num_images=2)
    h, w = image_hw(list_split(voc, "train")[0].image_path)
    ds = VOCSegDataset(voc, "train", (h, w))
    assert len(ds) == 1 and ds.num_filtered == 0
    x, y = ds[0]
    rgb, label = read_sample(ds.samples[0])
    assert np.array_equal(y.numpy(), label)  # the only crop of that size: the whole image
    assert x.shape == (3, h, w)
    with pytest.raises(DatasetError, match="choose a smaller crop"):
        VOCSegDataset(voc, "train", (h + 1, w))
    with pytest.raises(DatasetError, match="choose a smaller crop"):
        VOCSegDataset(voc, "train", (h, w + 1))


def test_crops_reach_every_offset_of_the_image(tmp_path):
    """Random crops of a 4x4 crop from a 5x6 label: top in {0, 1}, left in {0, 1, 2}, all used."""
    voc = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((5, 6, 3), np.uint8), "RGB").save(voc / "JPEGImages" / "a.jpg")
    label = (np.arange(5)[:, None] * 6 + np.arange(6)[None, :]).astype(np.uint8)  # id = 6 y + x
    Image.fromarray(label, "L").save(voc / "SegmentationClass" / "a.png")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    ds = VOCSegDataset(voc, "train", (4, 4), num_classes=30)
    torch.manual_seed(0)
    corners = {int(ds[0][1][0, 0]) for _ in range(60)}
    assert corners == {0, 1, 2, 6, 7, 8}


def test_exif_rotated_size_and_missing_image(tmp_path):
    img = Image.new("RGB", (40, 20))
    for orientation, hw in ((1, (20, 40)), (3, (20, 40)), (5, (40, 20)), (6, (40, 20)), (7, (40, 20)),
                            (8, (40, 20))):
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(tmp_path / f"o{orientation}.jpg", exif=exif)
        assert image_hw(tmp_path / f"o{orientation}.jpg") == hw
    with pytest.raises(ImageReadError, match="nope.jpg: no such file"):
        image_hw(tmp_path / "nope.jpg")


def test_label_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"label .*missing\.png not found"):
        read_label(tmp_path / "missing.png")
    Image.new("I;16", (4, 4)).save(tmp_path / "deep.png")
    with pytest.raises(DatasetError, match=r"deep\.png has unsupported PNG mode I;16 \(expected palette, "
                                           r"grayscale or RGB\)$"):
        read_label(tmp_path / "deep.png")


def test_split_file_lines_and_other_roots(small_voc):
    split = small_voc / "ImageSets" / "Segmentation" / "train.txt"
    names = [s.name for s in list_split(small_voc, "train")]
    split.write_text("\n  \n" + "\n".join(f"{n}  extra" for n in names) + "\n\n")
    assert [s.name for s in list_split(small_voc, "train")] == names  # blank lines, extra columns
    split.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DatasetError, match=r"cannot read split file .*train\.txt"):
        list_split(small_voc, "train")
    parent = small_voc.parent  # VOCdevkit: holds VOC2012 directly
    assert resolve_voc_root(parent) == small_voc


def test_synthetic_refuses_a_folder_with_photos_only(tmp_path):
    voc = write_synthetic_voc(tmp_path, num_images=2)
    (voc / "ImageSets" / "Segmentation" / "train.txt").unlink()
    with pytest.raises(ArtifactExistsError, match="already holds a dataset"):
        write_synthetic_voc(tmp_path, num_images=2)
    with pytest.raises(UsageError, match="val_fraction"):
        write_synthetic_voc(tmp_path / "z", num_images=4, val_fraction=0.0)


def test_synthetic_val_split_every_fourth_image(tmp_path):
    voc = write_synthetic_voc(tmp_path, num_images=8, val_fraction=0.25)
    assert [s.name for s in list_split(voc, "val")] == ["synth_00003", "synth_00007"]
    assert len(list_split(voc, "train")) == 6
    voc = write_synthetic_voc(tmp_path / "half", num_images=4, val_fraction=0.5)
    assert [s.name for s in list_split(voc, "val")] == ["synth_00001", "synth_00003"]


def test_synthetic_photo_shows_each_class_where_its_label_is():
    """Image-label consistency: pixels labelled c have the class's base colour on average (the
    texture and noise average out); background pixels do not look like any object class."""
    from fcn_deploy.voc import synth_sample

    rng = np.random.default_rng(0)
    for index in range(7):
        rgb, label = synth_sample(index, rng)
        bg = rgb[label == 0].reshape(-1, 3).mean(0)
        for c in set(np.unique(label).tolist()) - {0, IGNORE_INDEX}:
            pixels = rgb[label == c].reshape(-1, 3).astype(np.float64)
            if len(pixels) < 200:
                continue
            base = np.asarray(SYNTH_CLASSES[c][0], np.float64)
            assert np.abs(pixels.mean(0) - base).max() < 30, (index, c)
            assert np.abs(bg - base).max() > 30, (index, c)


def test_synthetic_layout_refusal_and_void_band_width(tmp_path):
    voc = write_synthetic_voc(tmp_path, num_images=2)
    assert voc == tmp_path / "VOCdevkit" / "VOC2012"  # the documented layout
    for jpg in (voc / "JPEGImages").glob("*.jpg"):
        jpg.unlink()
    with pytest.raises(ArtifactExistsError, match="already holds a dataset"):  # split files alone
        write_synthetic_voc(tmp_path, num_images=2)
    label = read_label(voc / "SegmentationClass" / "synth_00000.png")
    obj, bg = (label != 0) & (label != IGNORE_INDEX), label == 0
    for d in (1, 2):  # the 5-px band keeps objects and background at least 3 px apart
        assert not (obj[:, d:] & bg[:, :-d]).any() and not (obj[:, :-d] & bg[:, d:]).any()
        assert not (obj[d:] & bg[:-d]).any() and not (obj[:-d] & bg[d:]).any()
