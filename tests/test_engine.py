"""Engine building (real TensorRT-RTX builds on the CPU), naming, sidecars and engine selection."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys

import pytest
from click.testing import CliRunner

from fcn_deploy.cli import cli
from fcn_deploy.trt.build import build_engine
from fcn_deploy.trt.flavour import FLAVOURS, gc_paused, resolve_flavour
from fcn_deploy.trt.sidecar import (
    ENGINE_FORMAT,
    ENGINE_FORMAT_VERSION,
    engine_filename,
    engine_mismatch,
    find_engine,
    read_sidecar,
    rebuild_hint,
    sidecar_path,
)
from fcn_deploy.errors import (
    ArtifactExistsError,
    ArtifactReadError,
    BackendUnavailableError,
    EngineError,
    StaleArtifactError,
    UsageError,
)
from fcn_deploy.fileio import sha256_file

PORTABLE = {"portable": True, "compute_capabilities": ["8.0", "8.6", "8.9", "12.0"], "gpu": None}
H100 = {"portable": False, "compute_capabilities": ["9.0"], "gpu": "NVIDIA H100 80GB HBM3"}


def make_sidecar(*, precision="fp16", flavour="rtx", version="1.7.1.116", target=PORTABLE, sha="a" * 64):
    return {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        "precision": precision,
        "trt": {"flavour": flavour, "label": FLAVOURS[flavour].label, "version": version},
        "target": target,
        "parent": {"path": "/x/fcn.fp16.onnx", "sha256": "f" * 64},
        "source": {"path": "/nonexistent/fcn.onnx", "sha256": sha},
    }


def machine(cc="8.6", name="NVIDIA GeForce RTX 3090", rtx="1.7.1.116", tensorrt=None):
    gpu = None if cc is None else {"name": name, "compute_capability": cc}
    return {"trt": {"rtx": rtx, "tensorrt": tensorrt}, "gpu": gpu, "gpu_error": None if gpu else "no CUDA device found"}


# --- pure: naming, flavours, selection --------------------------------------------------------------
def test_engine_filename_shows_precision_flavour_version_and_target():
    assert (
        engine_filename("fcn", "fp16", FLAVOURS["rtx"], "1.7.1.116", PORTABLE)
        == "fcn.fp16.trt-rtx-1.7.1.portable.engine"
    )
    assert (
        engine_filename("fcn", "fp32", FLAVOURS["tensorrt"], "10.13.0.35", H100)
        == "fcn.fp32.trt-10.13.0.sm90-NVIDIA_H100_80GB_HBM3.engine"
    )


def test_flavours_keep_their_differences_in_one_place():
    rtx, full = FLAVOURS["rtx"], FLAVOURS["tensorrt"]
    assert rtx.portable and not rtx.needs_gpu_to_build and not rtx.supports_timing_cache
    assert full.needs_gpu_to_build and full.supports_timing_cache
    assert rtx.install_hint == "pip install 'fcn-deploy[rtx]'"
    assert full.install_hint == "pip install 'fcn-deploy[trt]'"


def test_missing_tensorrt_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(BackendUnavailableError, match=r"TensorRT is not installed.*fcn-deploy\[trt\]"):
        resolve_flavour("tensorrt")


def test_no_flavour_installed_names_both_extras(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    with pytest.raises(BackendUnavailableError, match=r"fcn-deploy\[trt\].*fcn-deploy\[rtx\]"):
        resolve_flavour("auto")
    with pytest.raises(UsageError, match="--trt"):
        resolve_flavour("trt11")


def test_rtx_is_imported_as_tensorrt_rtx_or_tensorrt_rtx_bindings(monkeypatch):
    from types import SimpleNamespace

    new = SimpleNamespace(__version__="2.0.0.1")
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", new)
    assert FLAVOURS["rtx"].load() is new
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    old = SimpleNamespace(__version__="1.7.1.116")
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", old)
    assert FLAVOURS["rtx"].load() is old
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)
    with pytest.raises(BackendUnavailableError, match=r"TensorRT-RTX is not installed.*fcn-deploy\[rtx\]"):
        FLAVOURS["rtx"].load()


def test_no_gpu_reason_names_what_torch_lacks(monkeypatch):
    import torch

    from fcn_deploy.trt.sidecar import gpu_info, no_gpu_reason

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert no_gpu_reason() == "this PyTorch is a CPU-only build"
    with pytest.raises(BackendUnavailableError, match=r"^no NVIDIA GPU on this machine \(this PyTorch is a CPU-only build\).*--backend ort"):
        gpu_info(0)
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def no_driver():
        raise RuntimeError("Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU")

    monkeypatch.setattr(torch.cuda, "init", no_driver)
    assert no_gpu_reason() == "torch sees no CUDA device: Found no NVIDIA driver on your system"


@pytest.mark.parametrize(
    "sidecar, facts, kwargs, expected",
    [
        (make_sidecar(), machine("8.6"), {}, None),
        (make_sidecar(), machine("12.0"), {"onnx_sha256": "a" * 64}, None),
        (make_sidecar(), machine("8.6"), {"onnx_sha256": "f" * 64}, None),  # the FP16 ONNX itself
        (make_sidecar(), machine("9.0", "NVIDIA H100"), {}, "built for sm_80/sm_86/sm_89/sm_120 (portable build), this GPU is sm_90"),
        (make_sidecar(flavour="tensorrt", version="10.13.0.35", target=H100), machine("8.9", tensorrt="10.13.0.35"), {},
         "built for sm_90 (NVIDIA H100 80GB HBM3), this GPU is sm_89"),
        (make_sidecar(flavour="tensorrt", version="10.13.0.35", target=H100), machine("9.0", tensorrt="10.14.1.48"), {},
         "built with TensorRT 10.13.0.35, this machine has 10.14.1.48"),
        (make_sidecar(flavour="tensorrt", version="10.13.0.35", target=H100), machine("9.0"), {},
         "not installed (pip install 'fcn-deploy[trt]')"),
        (make_sidecar(), machine(None), {}, "no GPU to run it on"),
        (make_sidecar(precision="fp32"), machine("8.6"), {"precision": "fp16"}, "fp32 engine, fp16 asked for"),
        (make_sidecar(), machine("8.6"), {"onnx_sha256": "b" * 64}, "stale: built from an ONNX with sha256 aaaaaaaaaaaa"),
    ],
)
def test_engine_mismatch(sidecar, facts, kwargs, expected):
    reason = engine_mismatch(sidecar, facts, **kwargs)
    if expected is None:
        assert reason is None
    else:
        assert expected in reason


def _write_fake_engine(folder, name, sidecar, mtime):
    import os

    engine = folder / name
    engine.write_bytes(b"plan")
    sidecar_path(engine).write_text(json.dumps(sidecar))
    os.utime(engine, (mtime, mtime))
    return engine


def test_find_engine_prefers_fp16_then_gpu_specific_then_newest(tmp_path):
    facts = machine("9.0", "NVIDIA H100 80GB HBM3", tensorrt="10.13.0.35")
    h100 = dict(flavour="tensorrt", version="10.13.0.35", target=H100)
    _write_fake_engine(tmp_path, "a.fp32.engine", make_sidecar(precision="fp32", **h100), 300)
    _write_fake_engine(tmp_path, "b.fp16.old.engine", make_sidecar(**h100), 100)
    best = _write_fake_engine(tmp_path, "c.fp16.new.engine", make_sidecar(**h100), 200)
    _write_fake_engine(tmp_path, "d.fp16.portable.engine", make_sidecar(), 400)  # RTX refuses sm_90
    assert find_engine(tmp_path, machine=facts) == best
    assert find_engine(tmp_path, precision="fp32", machine=facts).name == "a.fp32.engine"


def test_find_engine_explains_every_refusal(tmp_path):
    _write_fake_engine(tmp_path, "fcn.fp16.trt-10.13.0.sm90.engine",
                       make_sidecar(flavour="tensorrt", version="10.13.0.35", target=H100), 1)
    _write_fake_engine(tmp_path, "fcn.fp16.trt-rtx-1.7.1.portable.engine", make_sidecar(sha="c" * 64), 1)
    (tmp_path / "orphan.engine").write_bytes(b"plan")
    onnx = tmp_path / "fcn.onnx"
    onnx.write_bytes(b"current export")
    with pytest.raises(StaleArtifactError) as err:
        find_engine(tmp_path, onnx_path=onnx, machine=machine("8.9", tensorrt="10.13.0.35"))
    msg = str(err.value)
    assert "fits this machine (NVIDIA GeForce RTX 3090 sm_89)" in msg
    assert "fcn.fp16.trt-10.13.0.sm90.engine: built for sm_90" in msg and "this GPU is sm_89" in msg
    assert "fcn.fp16.trt-rtx-1.7.1.portable.engine: stale: built from an ONNX with sha256 cccccccccccc" in msg
    assert "orphan.engine.json" in msg
    assert "\n" not in msg


def test_find_engine_checks_the_export_named_in_the_sidecar(tmp_path):
    onnx = tmp_path / "fcn.onnx"
    onnx.write_bytes(b"export v1")
    sidecar = make_sidecar(sha=sha256_file(onnx))
    sidecar["source"]["path"] = str(onnx)
    engine = _write_fake_engine(tmp_path, "fcn.fp16.trt-rtx-1.7.1.portable.engine", sidecar, 1)
    assert find_engine(tmp_path, machine=machine()) == engine
    onnx.write_bytes(b"export v2, re-exported after training more")
    with pytest.raises(StaleArtifactError, match="stale"):
        find_engine(tmp_path, machine=machine())


def test_find_engine_without_gpu_says_so_and_suggests_ort(tmp_path):
    """Defect 12: no NVIDIA GPU is the reason, whatever engines exist; no rebuild hint."""
    _write_fake_engine(tmp_path, "a.engine", make_sidecar(), 1)
    for folder in (tmp_path, tmp_path / "none"):
        with pytest.raises(BackendUnavailableError) as err:
            find_engine(folder, machine=machine(None))
        msg = str(err.value)
        assert msg.startswith("no NVIDIA GPU on this machine (no CUDA device found)")
        assert "use --backend ort" in msg and "\n" not in msg
        assert "build-engine" not in msg and "pycuda" not in msg


def test_find_engine_on_this_cpu_machine_names_the_missing_gpu(tmp_path):
    """No fake facts: the real query of this machine (a CUDA torch without driver, or a CPU torch)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _write_fake_engine(tmp_path, "fcn.fp16.trt-rtx-1.7.1.portable.engine", make_sidecar(), 1)
    with pytest.raises(BackendUnavailableError, match=r"^no NVIDIA GPU on this machine \((torch sees no CUDA device|this PyTorch is a CPU-only build)") as err:
        find_engine(tmp_path)
    assert "--backend ort" in str(err.value) and "build-engine" not in str(err.value)


def test_cli_infer_trt_without_gpu(tmp_path, monkeypatch):
    """Defect 12 end to end: an engine exists, this machine has no GPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "engines").mkdir()
    sidecar = make_sidecar()
    sidecar["engine_sha256"] = hashlib.sha256(b"plan").hexdigest()  # the engine is intact
    _write_fake_engine(tmp_path / "engines", "fcn.fp16.trt-rtx-1.7.1.portable.engine", sidecar, 1)
    (tmp_path / "photos").mkdir()
    for args in (["infer", "photos", "--backend", "trt"],
                 ["infer", "photos", "--backend", "trt", "--model", "engines/fcn.fp16.trt-rtx-1.7.1.portable.engine"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        last = lines[-1]
        assert last.startswith("error: no NVIDIA GPU on this machine"), result.output
        assert len(lines) == 1, result.output  # issue 24: no "device: cuda:0" line before it
        assert "--backend ort" in last and "pycuda" not in result.output and "build-engine" not in result.output


def test_find_engine_without_engines(tmp_path):  # on a machine with a GPU
    with pytest.raises(EngineError, match=r"no engine in .*fcn-deploy build-engine --fp32"):
        find_engine(tmp_path / "engines", precision="fp32", machine=machine())


def test_rebuild_hint():
    assert rebuild_hint(make_sidecar(precision="fp32")) == (
        "fcn-deploy build-engine /nonexistent/fcn.onnx --fp32 --trt rtx --force"
    )


# --- real builds with TensorRT-RTX ------------------------------------------------------------------
@pytest.fixture(scope="module")
def rtx():
    return pytest.importorskip("tensorrt_rtx_bindings")


@pytest.fixture(scope="module")
def built(rtx, onnx_path, fp16_onnx_path, tmp_path_factory):
    """FP32 engine (with labels output) from the export, FP16 engine from the FP16 export."""
    engines = tmp_path_factory.mktemp("engines")
    fp32 = build_engine(onnx_path, precision="fp32", flavour="rtx", engines_dir=engines, labels_output=True)
    fp16 = build_engine(fp16_onnx_path, precision="fp16", flavour="rtx", engines_dir=engines)
    return fp32, fp16


def test_fp32_and_fp16_engines_and_sidecars(built, rtx, onnx_path, fp16_onnx_path):
    from fcn_deploy.artifacts import read_artifact_meta

    fp32, fp16 = built
    version = ".".join(rtx.__version__.split(".")[:3])
    assert fp32.engine.name == f"fcn.fp32.trt-rtx-{version}.portable.engine"
    assert fp16.engine.name == f"fcn.fp16.trt-rtx-{version}.portable.engine"
    onnx_meta = read_artifact_meta(onnx_path)
    for report, parent in ((fp32, onnx_path), (fp16, fp16_onnx_path)):
        side = read_sidecar(report.engine)
        assert side == report.meta
        assert report.sidecar == sidecar_path(report.engine)
        assert side["trt"] == {"flavour": "rtx", "label": "TensorRT-RTX", "version": rtx.__version__}
        assert side["target"]["portable"] and "8.6" in side["target"]["compute_capabilities"]
        assert "7.5" not in side["target"]["compute_capabilities"]  # Turing needs an explicit target
        assert side["engine_sha256"] == sha256_file(report.engine)
        assert side["parent"]["sha256"] == sha256_file(parent)
        assert side["source"]["sha256"] == sha256_file(onnx_path)
        assert side["io"]["inputs"] == [{"name": "image", "shape": [-1, 3, 320, 480], "dtype": "float32"}]
        assert side["io"]["outputs"][0] == {"name": "logits", "shape": [-1, 21, 320, 480], "dtype": "float32"}
        assert side["profile"] == {"input": "image", "min": [1, 3, 320, 480], "opt": [8, 3, 320, 480], "max": [32, 3, 320, 480]}
        for key in ("classes", "colormap", "mean", "std", "tile_hw", "num_classes"):
            assert side[key] == onnx_meta[key]
        assert side["build"]["seconds"] > 0
    assert fp32.meta["precision"] == "fp32" and fp16.meta["precision"] == "fp16"
    assert fp32.meta["build"]["tf32"] is False
    assert fp32.meta["io"]["outputs"][1] == {"name": "labels", "shape": [-1, 1, 320, 480], "dtype": "uint8"}
    assert len(fp16.meta["io"]["outputs"]) == 1 and fp16.meta["labels_output"] is None
    # FP16 weights: the FP16 engine is about half the FP32 one
    assert fp16.engine.stat().st_size < 0.6 * fp32.engine.stat().st_size


def test_existing_engine_needs_force(built, fp16_onnx_path):
    _, fp16 = built
    before = fp16.engine.stat().st_mtime_ns
    with pytest.raises(ArtifactExistsError, match="--force"):
        build_engine(fp16_onnx_path, fp16.engine, flavour="rtx")
    assert fp16.engine.stat().st_mtime_ns == before
    again = build_engine(fp16_onnx_path, fp16.engine, flavour="rtx", force=True, timing_cache=fp16.engine.parent / "tc")
    assert again.engine == fp16.engine
    assert any("no timing cache" in n for n in again.notes) and not (fp16.engine.parent / "tc").exists()


def test_fp16_onnx_beside_the_export_is_reused_or_remade_when_stale(rtx, onnx_path, fp16_onnx_path, tmp_path):
    import onnx

    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(onnx_path, export / "fcn.onnx")
    shutil.copy(fp16_onnx_path, export / "fcn.fp16.onnx")  # same bytes: its parent sha256 matches
    first = build_engine(export / "fcn.onnx", precision="fp16", flavour="rtx", engines_dir=tmp_path / "engines")
    assert first.fp16_onnx is None  # up to date: reused
    assert first.meta["parent"]["sha256"] == sha256_file(fp16_onnx_path)
    model = onnx.load(export / "fcn.onnx")
    model.doc_string = "re-exported"
    onnx.save(model, export / "fcn.onnx")
    again = build_engine(export / "fcn.onnx", first.engine, flavour="rtx", force=True)
    assert again.fp16_onnx == export / "fcn.fp16.onnx"
    assert again.meta["source"]["sha256"] == sha256_file(export / "fcn.onnx")
    assert again.meta["parent"]["sha256"] == sha256_file(export / "fcn.fp16.onnx")
    from fcn_deploy.artifacts import read_artifact_meta

    assert read_artifact_meta(export / "fcn.fp16.onnx")["parent"]["sha256"] == sha256_file(export / "fcn.onnx")


def test_fp16_onnx_refuses_fp32_build(rtx, fp16_onnx_path, tmp_path):
    with pytest.raises(UsageError, match="is an FP16 ONNX"):
        build_engine(fp16_onnx_path, tmp_path / "x.engine", precision="fp32", flavour="rtx")


def test_garbage_onnx_is_refused(rtx, tmp_path):
    bad = tmp_path / "fcn.onnx"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ArtifactReadError, match="not a readable ONNX"):
        build_engine(bad, tmp_path / "x.engine", precision="fp32", flavour="rtx")
    assert not (tmp_path / "x.engine").exists()


@pytest.fixture(scope="module")
def broken_onnx(onnx_path, tmp_path_factory):
    """Two ONNX files keeping the export's metadata: one with an unknown op, one with a dangling input."""
    import onnx
    from onnx import helper

    folder = tmp_path_factory.mktemp("broken")
    model = onnx.load(onnx_path)
    first = model.graph.node[0]
    node_name, original_input = first.name, first.input[0]
    first.op_type, first.domain = "FancyOp", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(model, folder / "unsupported.onnx")
    first.op_type, first.domain = "Conv", ""
    del model.opset_import[-1]
    first.input[0] = "tensor_nobody_makes"
    onnx.save(model, folder / "dangling.onnx")
    assert original_input != "tensor_nobody_makes"
    return folder, node_name


@pytest.mark.parametrize("name, words", [("unsupported", ["FancyOp", "INVALID_NODE"]), ("dangling", ["Conv", "INVALID_GRAPH"])])
def test_parser_errors_are_reported_in_full(rtx, broken_onnx, name, words, tmp_path):
    folder, node_name = broken_onnx
    with pytest.raises(EngineError) as err:
        build_engine(folder / f"{name}.onnx", tmp_path / "x.engine", precision="fp32", flavour="rtx")
    msg = str(err.value)
    assert "ONNX parser error(s)" in msg and f"node 0 {node_name!r}" in msg
    for word in words:
        assert word in msg
    assert not (tmp_path / "x.engine").exists()


def test_bad_build_options(tmp_path):
    with pytest.raises(UsageError, match="--min-batch 8 <= --opt-batch 4"):
        build_engine(tmp_path / "fcn.onnx", min_batch=8, opt_batch=4)
    with pytest.raises(UsageError, match="precision must be one of fp16, fp32, int8, not 'bf16'"):
        build_engine(tmp_path / "fcn.onnx", precision="bf16")


# --- CLI ---------------------------------------------------------------------------------------------
def test_cli_build_engine(rtx, onnx_path, tmp_path):
    out = tmp_path / "e" / "fcn.engine"
    args = ["build-engine", str(onnx_path), "--fp32", "-o", str(out), "--trt", "rtx", "--max-batch", "4", "--opt-batch", "2", "--workspace", "512"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "output labels" not in result.output
    side = read_sidecar(out)
    assert side["profile"]["max"] == [4, 3, 320, 480] and side["build"]["workspace_mib"] == 512
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "error:" in result.output and "--force" in result.output and "Traceback" not in result.output


def test_cli_tensorrt_not_installed(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = CliRunner().invoke(cli, ["build-engine", str(tmp_path / "fcn.onnx"), "--trt", "tensorrt"])
    assert result.exit_code == 2
    assert "error: TensorRT is not installed" in result.output and "fcn-deploy[trt]" in result.output


def test_gc_paused_collects_first_and_restores_the_collector():
    import gc


    class Cycle:
        pass

    a = Cycle()
    a.self = a
    del a
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        assert not any(type(o) is Cycle for o in gc.get_objects())  # collected on entry

    @gc_paused()
    def fails():
        assert not gc.isenabled()
        raise ValueError("boom")

    with pytest.raises(ValueError):
        fails()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # left as found
    finally:
        gc.enable()
