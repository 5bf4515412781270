"""Shared fixtures: a random-weight checkpoint, its ONNX exports and a synthetic VOC set,
each built once per test session. GPU tests (``@pytest.mark.gpu``) skip without CUDA."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch


try:
    from hypothesis import Phase, settings
except ImportError:  # hypothesis is in the test extra
    settings = None
if settings is not None:
    # Property tests take their example count from the active profile (no max_examples of their
    # own): "fcn-deploy" for every pytest run, CI included; "mutation" for the mutant runs of
    # mutation/run.py (``--hypothesis-profile=mutation``), where a property test runs once per
    # mutant that reaches it: fewer examples, and no shrinking (a failing example already kills
    # the mutant; its minimal form is not needed). See docs/testing.md.
    settings.register_profile("fcn-deploy", max_examples=200, deadline=None)
    settings.register_profile("mutation", max_examples=25, deadline=None, database=None,
                              phases=[Phase.explicit, Phase.generate])
    settings.load_profile("fcn-deploy")  # --hypothesis-profile, when given, loads another one later


def _cuda_available() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # a CUDA build on a machine without driver
        return False


@pytest.hookimpl(trylast=True)  # after pytest's tmpdir plugin has made its factory
def pytest_configure(config):
    """hypothesis writes its caches (example database, source constants) to ./.hypothesis by
    default, i.e. into the working directory: point it into pytest's tmp folder of this session
    (tests write only under pytest's tmp folders)."""
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:  # hypothesis is in the test extra
        return
    factory = getattr(config, "_tmp_path_factory", None)  # set by pytest's tmpdir plugin
    if factory is not None:
        set_hypothesis_home_dir(factory.mktemp("hypothesis", numbered=False))


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not keywords: a folder named gpu matches those
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory):
    """A random-weight FCN (21 classes, seed 0) saved as an fcn-deploy checkpoint."""
    from fcn_deploy.model import FCN, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, FCN().eval())
    return path


@pytest.fixture(scope="session")
def onnx_path(checkpoint_path, tmp_path_factory):
    """The checkpoint exported to ONNX (320x480, dynamic batch), verified on export."""
    from fcn_deploy.export.torch_export import export_onnx

    out = tmp_path_factory.mktemp("export") / "fcn.onnx"
    export_onnx(checkpoint_path, out)
    return out


@pytest.fixture(scope="session")
def fp16_onnx_path(onnx_path):
    """The strongly typed FP16 variant of :func:`onnx_path` (float32 IO)."""
    from fcn_deploy.export.fp16 import convert_fp16

    return convert_fp16(onnx_path)


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory):
    """A small synthetic VOC-format dataset; returns its VOCdevkit/VOC2012 folder."""
    from fcn_deploy.voc import write_synthetic_voc

    return write_synthetic_voc(tmp_path_factory.mktemp("voc"), num_images=12, seed=0)


@pytest.fixture()
def external_data_onnx():
    """``make(folder, location)``: a small fcn-deploy ONNX whose external data is missing or escapes."""
    return _onnx_with_external_data


def _onnx_with_external_data(folder, location):
    """A small fcn-deploy ONNX at folder/fcn.onnx whose weight lives in external data at
    ``location`` (relative to the folder), which does not exist or escapes the folder."""
    import onnx
    from onnx import helper, numpy_helper

    from fcn_deploy.artifacts import embed_meta

    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", 1, [1, 4])],
                              [helper.make_tensor_value_info("y", 1, [1, 4])], [w])
    model = helper.make_model(graph)
    embed_meta(model, {"precision": "fp32", "tile_hw": [32, 32]})
    onnx.save_model(model, folder / "fcn.onnx", save_as_external_data=True, location="w.data", size_threshold=0)
    (folder / "w.data").unlink()
    if location != "w.data":
        model = onnx.load(folder / "fcn.onnx", load_external_data=False)
        for entry in model.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save(model, folder / "fcn.onnx")
    return folder / "fcn.onnx"


def _png_header_only(path, width, height):
    """A 1-bit grayscale PNG declaring width x height, with a few bytes of image data: what a
    decompression bomb's header looks like, written without allocating its pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture()
def bomb_png():
    """``bomb_png(path, width, height)`` writes a decompression bomb's PNG header (see
    :func:`_png_header_only`) at ``path`` and returns ``path``."""
    return _png_header_only
