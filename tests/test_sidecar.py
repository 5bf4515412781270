"""Engine sidecar and selection (fcn_deploy/trt/sidecar.py) without a GPU or TensorRT: which of
several fitting engines is chosen, every refusal, the sidecar's own checks and the GPU facts
(torch's CUDA queries replaced)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from fcn_deploy.errors import (
    ArtifactNotFoundError,
    BackendUnavailableError,
    EngineError,
    StaleArtifactError,
    UsageError,
)
from fcn_deploy.trt.flavour import FLAVOURS
from fcn_deploy.trt.sidecar import (
    ENGINE_FORMAT,
    ENGINE_FORMAT_VERSION,
    cc_tag,
    check_engine_file,
    current_onnx_sha256,
    engine_filename,
    engine_mismatch,
    find_engine,
    no_gpu_message,
    read_sidecar,
    rebuild_hint,
    sidecar_path,
    target_tag,
)

PORTABLE = {"portable": True, "compute_capabilities": ["8.6", "9.0"], "gpu": None}
H100 = {"portable": False, "compute_capabilities": ["9.0"], "gpu": "NVIDIA H100"}


def sidecar(*, precision="fp16", flavour="rtx", version="1.7.1.116", target=PORTABLE, source_sha="a" * 64,
            source_path="/nonexistent/fcn.onnx"):
    return {
        "format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION, "precision": precision,
        "trt": {"flavour": flavour, "label": FLAVOURS[flavour].label, "version": version},
        "target": target,
        "parent": {"path": "/x/fcn.fp16.onnx", "sha256": "f" * 64},
        "source": {"path": source_path, "sha256": source_sha},
    }


#: an H100 with both flavours installed: the portable RTX and the H100 TensorRT engines both fit
FACTS = {"trt": {"rtx": "1.7.1.116", "tensorrt": "10.13.0.35"},
         "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0"}, "gpu_error": None}
TRT = {"flavour": "tensorrt", "version": "10.13.0.35", "target": H100}


def write_engine(folder, name, content, mtime=1000):
    engine = folder / name
    engine.write_bytes(b"plan")
    sidecar_path(engine).write_text(json.dumps(content))
    os.utime(engine, (mtime, mtime))
    return engine


# -- which engine is chosen --------------------------------------------------------------------
def test_precision_beats_target_and_target_beats_age(tmp_path):
    write_engine(tmp_path, "a.engine", sidecar(precision="fp32", **TRT), mtime=3000)  # newest, GPU-specific
    portable16 = write_engine(tmp_path, "b.engine", sidecar(), mtime=1000)
    assert find_engine(tmp_path, machine=FACTS) == portable16  # fp16 first, even portable and older
    h100_16 = write_engine(tmp_path, "c.engine", sidecar(**TRT), mtime=500)
    assert find_engine(tmp_path, machine=FACTS) == h100_16  # then GPU-specific, even older
    assert find_engine(tmp_path, precision="fp32", machine=FACTS).name == "a.engine"
    assert find_engine(tmp_path, precision="fp16", machine=FACTS) == h100_16


def test_newest_of_equal_engines_wins_and_a_tie_goes_to_the_first_name(tmp_path):
    write_engine(tmp_path, "b.engine", sidecar(), mtime=1000)
    newest = write_engine(tmp_path, "c.engine", sidecar(), mtime=2000)
    write_engine(tmp_path, "a.engine", sidecar(), mtime=1500)
    assert find_engine(tmp_path, machine=FACTS) == newest
    os.utime(newest, (1500, 1500))  # a and c now tie: the first by name
    assert find_engine(tmp_path, machine=FACTS).name == "a.engine"
    os.utime(tmp_path / "b.engine", (1500, 1500))
    assert find_engine(tmp_path, machine=FACTS).name == "a.engine"


def test_only_files_named_engine_count(tmp_path):
    write_engine(tmp_path, "fcn.engine.bak", sidecar(), mtime=5000)
    chosen = write_engine(tmp_path, "fcn.engine", sidecar(), mtime=1)
    assert find_engine(tmp_path, machine=FACTS) == chosen


def test_precision_must_be_one_engines_are_built_in(tmp_path):
    write_engine(tmp_path, "a.engine", sidecar())
    with pytest.raises(UsageError, match="^precision must be one of fp16, fp32, int8, not 'bf16'$"):
        find_engine(tmp_path, precision="bf16", machine=FACTS)
    with pytest.raises(EngineError, match="a.engine: fp16 engine, int8 asked for"):  # int8 is one now
        find_engine(tmp_path, precision="int8", machine=FACTS)


def test_no_engine_message_names_the_folder_and_the_precision(tmp_path):
    for folder in (tmp_path / "missing", tmp_path):
        with pytest.raises(EngineError, match=rf"^no engine in {folder}/; build one with: fcn-deploy build-engine --fp16$"):
            find_engine(folder, machine=FACTS)
    (tmp_path / "not-a-folder").write_text("x")
    with pytest.raises(EngineError, match="--fp32$"):
        find_engine(tmp_path / "not-a-folder", precision="fp32", machine=FACTS)


def test_refusals_are_listed_one_per_engine_and_stale_only_when_one_is_stale(tmp_path):
    write_engine(tmp_path, "a.engine", sidecar(precision="fp32"))
    broken = sidecar()
    del broken["trt"]
    write_engine(tmp_path, "b.engine", broken)
    with pytest.raises(EngineError) as err:
        find_engine(tmp_path, precision="fp16", machine=FACTS)
    assert type(err.value) is EngineError
    assert str(err.value) == (
        f"no engine in {tmp_path}/ fits this machine (NVIDIA H100 sm_90): a.engine: fp32 engine, fp16 asked "
        "for; b.engine: incomplete sidecar (missing 'trt'); build one here with: fcn-deploy build-engine --fp16")
    onnx = tmp_path / "fcn.onnx"
    onnx.write_bytes(b"the current export")
    write_engine(tmp_path, "c.engine", sidecar())  # fits, but made from another export
    with pytest.raises(StaleArtifactError, match="c.engine: stale: built from an ONNX"):
        find_engine(tmp_path, precision="fp16", onnx_path=onnx, machine=FACTS)
    fresh = sidecar(source_sha=hashlib.sha256(b"the current export").hexdigest())
    chosen = write_engine(tmp_path, "d.engine", fresh)
    assert find_engine(tmp_path, onnx_path=onnx, machine=FACTS) == chosen


def test_each_engine_is_checked_against_the_export_its_sidecar_names(tmp_path):
    v1, v2 = tmp_path / "v1.onnx", tmp_path / "v2.onnx"
    v1.write_bytes(b"export one")
    v2.write_bytes(b"export two")
    sha1, sha2 = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (v1, v2))
    write_engine(tmp_path, "a.engine", sidecar(source_path=str(v1), source_sha=sha2), mtime=2000)  # stale
    chosen = write_engine(tmp_path, "b.engine", sidecar(source_path=str(v2), source_sha=sha2), mtime=1000)
    assert find_engine(tmp_path, machine=FACTS) == chosen
    with pytest.raises(ArtifactNotFoundError, match="^ONNX .*gone.onnx not found$"):
        find_engine(tmp_path, onnx_path=tmp_path / "gone.onnx", machine=FACTS)


def test_no_gpu_fails_before_looking_at_engines(tmp_path):
    no_gpu = {"trt": {"rtx": "1.7.1.116"}, "gpu": None, "gpu_error": "a broken driver"}
    with pytest.raises(BackendUnavailableError, match=r"^no NVIDIA GPU on this machine \(a broken driver\)"):
        find_engine(tmp_path / "missing", machine=no_gpu)
    assert no_gpu_message(None).startswith("no NVIDIA GPU on this machine (torch sees no CUDA device): ")
    assert no_gpu_message("why") == (
        "no NVIDIA GPU on this machine (why): TensorRT engines run only on an NVIDIA GPU; "
        "use --backend ort to run the ONNX with onnxruntime on the CPU")


# -- why an engine does not fit ---------------------------------------------------------------
def test_mismatch_reasons_in_order():
    assert engine_mismatch(sidecar(), FACTS) is None
    assert engine_mismatch(sidecar(precision="fp32"), FACTS) is None  # any precision when none asked
    old = {**sidecar(), "format_version": ENGINE_FORMAT_VERSION + 1}
    assert engine_mismatch(old, FACTS) == f"sidecar format version {ENGINE_FORMAT_VERSION + 1}, expected 1"
    odd = sidecar()
    odd["trt"]["flavour"] = "onnx-tensorrt"
    assert engine_mismatch(odd, FACTS) == "unknown TensorRT flavour 'onnx-tensorrt'"
    assert engine_mismatch(sidecar(), {**FACTS, "trt": {"rtx": None}}) == (
        "built with TensorRT-RTX 1.7.1.116, which is not installed (pip install 'fcn-deploy[rtx]')")
    assert engine_mismatch(sidecar(), {**FACTS, "trt": {"rtx": "1.7.1.117"}}) == (
        "built with TensorRT-RTX 1.7.1.116, this machine has 1.7.1.117")
    ada = {**FACTS, "gpu": {"name": "RTX 4090", "compute_capability": "8.9"}}
    assert engine_mismatch(sidecar(), ada) == "built for sm_86/sm_90 (portable build), this GPU is sm_89 (RTX 4090)"
    assert engine_mismatch(sidecar(**TRT), ada).startswith("built for sm_90 (NVIDIA H100), this GPU is sm_89")
    anon = sidecar(**{**TRT, "target": {"portable": False, "compute_capabilities": ["9.0"], "gpu": None}})
    assert "(another GPU)" in engine_mismatch(anon, ada)
    assert engine_mismatch(sidecar(), {**FACTS, "gpu": None}) == "no GPU to run it on"
    # the current ONNX may be the parent (the FP16 child) or the source (the FP32 export)
    assert engine_mismatch(sidecar(), FACTS, onnx_sha256="f" * 64) is None
    assert engine_mismatch(sidecar(), FACTS, onnx_sha256="a" * 64) is None
    assert engine_mismatch(sidecar(), FACTS, onnx_sha256="b" * 64) == (
        "stale: built from an ONNX with sha256 aaaaaaaaaaaa, the current one is bbbbbbbbbbbb")


def test_current_onnx_sha256(tmp_path):
    onnx = tmp_path / "fcn.onnx"
    onnx.write_bytes(b"x")
    sha = hashlib.sha256(b"x").hexdigest()
    assert current_onnx_sha256(sidecar(source_path=str(onnx))) == sha
    assert current_onnx_sha256(sidecar(), onnx) == sha  # the path given wins over the sidecar's
    assert current_onnx_sha256(sidecar()) is None  # the sidecar's export is gone: not checked
    with pytest.raises(ArtifactNotFoundError):
        current_onnx_sha256(sidecar(source_path=str(onnx)), tmp_path / "gone.onnx")


# -- names and the sidecar file ----------------------------------------------------------------
def test_names():
    assert cc_tag("8.9") == "sm_89" and cc_tag("12.0") == "sm_120"
    assert target_tag(PORTABLE) == "portable"
    assert target_tag({"portable": False, "compute_capabilities": ["9.0", "8.6"], "gpu": "  NVIDIA  H100 (SXM)!"}) == (
        "sm90-NVIDIA_H100_SXM")
    assert target_tag({"portable": False, "compute_capabilities": ["8.9"], "gpu": "NVIDIA GeForce RTX 4090"}) == (
        "sm89-NVIDIA_GeForce_RTX_4090")
    assert target_tag({"portable": False, "compute_capabilities": ["7.5"], "gpu": "_Quadro RTX_"}) == "sm75-Quadro_RTX"
    assert target_tag({"portable": False, "compute_capabilities": ["8.9"], "gpu": None}) == "sm89"
    assert target_tag({"portable": False, "compute_capabilities": ["8.9"]}) == "sm89"
    assert engine_filename("net", "fp32", FLAVOURS["tensorrt"], "10.13.0.35", H100) == (
        "net.fp32.trt-10.13.0.sm90-NVIDIA_H100.engine")
    assert sidecar_path("engines/fcn.fp16.engine").as_posix() == "engines/fcn.fp16.engine.json"


def test_read_sidecar_refusals(tmp_path):
    engine = tmp_path / "fcn.engine"
    with pytest.raises(EngineError, match=r"^.*fcn.engine has no sidecar fcn.engine.json; rebuild it with fcn-deploy build-engine$"):
        read_sidecar(engine)
    path = sidecar_path(engine)
    path.write_text("{not json")
    with pytest.raises(EngineError, match="^cannot read engine sidecar .*fcn.engine.json: "):
        read_sidecar(engine)
    for foreign in ({"format": "other"}, ["fcn-deploy-engine"], {}):
        path.write_text(json.dumps(foreign))
        with pytest.raises(EngineError, match=r"fcn.engine.json is not an fcn-deploy engine sidecar$"):
            read_sidecar(engine)
    path.write_text(json.dumps(sidecar()))
    assert read_sidecar(engine) == sidecar()


def test_engine_bytes_must_match_the_sidecar(tmp_path):
    engine = tmp_path / "fcn.engine"
    engine.write_bytes(b"plan")
    good = {**sidecar(), "engine_sha256": hashlib.sha256(b"plan").hexdigest()}
    check_engine_file(engine, good)
    engine.write_bytes(b"pla")  # truncated
    with pytest.raises(EngineError, match=r"fcn.engine is not the engine its sidecar describes .*rebuild it: "
                                          r"fcn-deploy build-engine /nonexistent/fcn.onnx --fp16 --trt rtx --force$"):
        check_engine_file(engine, good)
    with pytest.raises(EngineError):
        check_engine_file(engine, sidecar())  # no recorded sha256


def test_rebuild_hint_defaults():
    assert rebuild_hint({}) == "fcn-deploy build-engine export/fcn.onnx --fp16 --trt auto --force"
    assert rebuild_hint(sidecar(precision="fp32", flavour="tensorrt")) == (
        "fcn-deploy build-engine /nonexistent/fcn.onnx --fp32 --trt tensorrt --force")


# -- machine facts (torch's CUDA queries replaced) ---------------------------------------------
@pytest.fixture
def two_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(9, 0), (12, 0)][i])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: ["NVIDIA H100", "RTX PRO 6000"][i])


def test_gpu_info_and_machine_facts(two_gpus, monkeypatch):
    from fcn_deploy.trt import sidecar as mod

    assert mod.gpu_info() == {"name": "NVIDIA H100", "compute_capability": "9.0"}
    assert mod.gpu_info(1) == {"name": "RTX PRO 6000", "compute_capability": "12.0"}
    for bad in (2, -1):
        with pytest.raises(UsageError, match=rf"^--device cuda:{bad} does not exist; this machine has 2 CUDA device\(s\)$"):
            mod.gpu_info(bad)
    from types import SimpleNamespace

    monkeypatch.setitem(FLAVOURS, "rtx", SimpleNamespace(load=lambda: SimpleNamespace(__version__="1.7.1.116")))
    facts = mod.machine_facts(1, flavours=["rtx"])
    assert facts == {"trt": {"rtx": "1.7.1.116"}, "gpu": {"name": "RTX PRO 6000", "compute_capability": "12.0"},
                     "gpu_error": None}

    def missing():
        raise BackendUnavailableError("not installed")

    monkeypatch.setitem(FLAVOURS, "rtx", SimpleNamespace(load=missing))
    assert mod.machine_facts(0, flavours=["rtx"])["trt"] == {"rtx": None}
    monkeypatch.setitem(FLAVOURS, "tensorrt", SimpleNamespace(load=lambda: SimpleNamespace(__version__="10.13.0.35")))
    facts = mod.machine_facts()  # every flavour, device 0
    assert facts["trt"] == {"tensorrt": "10.13.0.35", "rtx": None} and facts["gpu"]["name"] == "NVIDIA H100"


def test_no_gpu_reason_of_a_raising_driver(monkeypatch):
    import torch

    from fcn_deploy.trt import sidecar as mod

    def broken():
        raise RuntimeError("CUDA driver   initialization\n failed")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    assert mod.no_gpu_reason() == "CUDA driver initialization failed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    assert mod.no_gpu_reason() == "torch sees no CUDA device"

    def no_gpus():
        raise RuntimeError(" No CUDA GPUs are available. ")

    monkeypatch.setattr(torch.cuda, "init", no_gpus)
    assert mod.no_gpu_reason() == "torch sees no CUDA device: No CUDA GPUs are available"
    monkeypatch.setattr(torch.cuda, "init", lambda: (_ for _ in ()).throw(RuntimeError("No driver for XX. Try again.")))
    assert mod.no_gpu_reason() == "torch sees no CUDA device: No driver for XX"  # the first sentence only
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    facts = mod.machine_facts(flavours=[])
    assert facts == {"trt": {}, "gpu": None, "gpu_error": "torch sees no CUDA device"}


def test_default_folder_and_this_machine_s_facts(tmp_path, monkeypatch):
    from fcn_deploy.trt import sidecar as mod

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mod, "machine_facts", lambda *a, **k: FACTS)
    (tmp_path / "engines").mkdir()
    chosen = write_engine(tmp_path / "engines", "fcn.engine", sidecar())
    assert find_engine().resolve() == chosen.resolve()


def test_the_build_hint_names_the_precision_asked_for(tmp_path):
    write_engine(tmp_path, "a.engine", sidecar(version="1.0.0.1"))  # another TensorRT-RTX version
    write_engine(tmp_path, "b.engine", sidecar(precision="fp32", version="1.0.0.1"))
    for precision, flag in ((None, "--fp16"), ("fp32", "--fp32"), ("fp16", "--fp16")):
        with pytest.raises(EngineError, match=rf"; build one here with: fcn-deploy build-engine {flag}$"):
            find_engine(tmp_path, precision=precision, machine=FACTS)
