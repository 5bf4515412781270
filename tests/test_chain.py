"""The artifact chain (fcn_deploy/chain.py) on tiny hand-made artifacts: a checkpoint file of a few
bytes, ONNX files of one Identity node carrying fcn-deploy metadata, an engine with its sidecar.
No model, no export: each staleness rule and each message on its own."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from fcn_deploy.artifacts import embed_meta
from fcn_deploy.chain import (
    Resolved,
    derived_onnx_path,
    fp16_onnx_path,
    fp32_sibling,
    int8_onnx_path,
    onnx_staleness,
    resolve,
)
from fcn_deploy.errors import ArtifactNotFoundError, ArtifactReadError, StaleArtifactError, UsageError
from fcn_deploy.fileio import sha256_file


def write_onnx(path: Path, parent: Path | None, precision: str | None = "fp32", *, sha: str | None = None,
               meta: bool = True) -> Path:
    """An ONNX of one Identity node whose metadata records ``parent`` (its sha256 now, or ``sha``)."""
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    if meta:
        record = {"tile_hw": [1, 1]}
        if precision is not None:
            record["precision"] = precision
        if parent is not None:
            record["parent"] = {"path": str(parent), "sha256": sha if sha is not None else sha256_file(parent)}
        embed_meta(model, record)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


@pytest.fixture
def chain(tmp_path):
    """model.pt -> export/fcn.onnx -> export/fcn.fp16.onnx, all fresh."""
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights v1")
    fp32 = write_onnx(tmp_path / "export" / "fcn.onnx", ckpt)
    fp16 = write_onnx(tmp_path / "export" / "fcn.fp16.onnx", fp32, "fp16")
    return ckpt, fp32, fp16


# -- names ------------------------------------------------------------------------------------
def test_derived_names_sit_beside_the_fp32_export():
    onnx_path = Path("export/fcn.onnx")
    assert derived_onnx_path(onnx_path, "fp32") == onnx_path
    assert derived_onnx_path("export/fcn.onnx", "fp16") == Path("export/fcn.fp16.onnx")
    assert fp16_onnx_path("out/net.onnx") == Path("out/net.fp16.onnx")
    assert int8_onnx_path("out/net.onnx") == Path("out/net.int8.onnx")
    assert fp32_sibling("export/fcn.fp16.onnx") == Path("export/fcn.onnx")
    assert fp32_sibling("export/fcn.onnx") == Path("export/fcn.onnx")
    assert fp32_sibling(Path("a/b/net.int8.onnx")) == Path("a/b/net.onnx")


def test_resolved_require_fresh():
    assert Resolved("ort", Path("x.onnx"), "onnx", "fp32").require_fresh() == Path("x.onnx")
    with pytest.raises(StaleArtifactError, match="^x.onnx is stale$"):
        Resolved("ort", Path("x.onnx"), "onnx", "fp32", "x.onnx is stale").require_fresh()


# -- onnx_staleness ---------------------------------------------------------------------------
def test_fresh_then_stale_when_the_parent_changes(chain):
    ckpt, fp32, fp16 = chain
    assert onnx_staleness(fp32) is None and onnx_staleness(fp16) is None
    assert onnx_staleness(fp32, ckpt, parent_required=True) is None
    old = sha256_file(ckpt)
    ckpt.write_bytes(b"weights v2")  # trained more
    reason = onnx_staleness(fp32)
    assert reason == (f"{fp32} is stale: {ckpt} has changed since it was made from it (sha256 {old[:12]} then, "
                      f"{sha256_file(ckpt)[:12]} now); rebuild it: fcn-deploy export {ckpt} -o {fp32} --force")
    assert onnx_staleness(fp16) is None  # its own parent, fcn.onnx, did not change
    before = sha256_file(fp32)
    write_onnx(fp32, ckpt)  # re-exported after training more: new bytes, so the fp16 child is stale
    assert onnx_staleness(fp16) == (
        f"{fp16} is stale: {fp32} has changed since it was made from it (sha256 {before[:12]} then, "
        f"{sha256_file(fp32)[:12]} now); rebuild it: fcn-deploy export <checkpoint> -o {fp32} --fp16 --force")


def test_the_parent_named_by_the_caller_wins_over_the_recorded_one(chain, tmp_path):
    ckpt, fp32, _ = chain
    other = tmp_path / "other.pt"
    other.write_bytes(b"another checkpoint")
    assert onnx_staleness(fp32, other) is not None
    # issue 24: it names the parent it was made from (not the one given) and how to use it
    assert onnx_staleness(fp32, other) == (
        f"{fp32} is stale for {other}: it was made from {ckpt} (sha256 {sha256_file(ckpt)[:12]}), not from "
        f"{other} ({sha256_file(other)[:12]}); to use it, name {ckpt} as its checkpoint (check: --model {ckpt}); "
        f"to make it from {other}: fcn-deploy export {other} -o {fp32} --force")
    ckpt.write_bytes(b"trained on")  # the recorded parent changed too: nothing to point to
    assert "to use it" not in onnx_staleness(fp32, other)
    assert onnx_staleness(fp32, str(other)).startswith(f"{fp32} is stale for {other}: it was made from {ckpt}")


def test_an_absent_parent_is_stale_only_when_required(chain, tmp_path):
    ckpt, fp32, _ = chain
    ckpt.unlink()
    assert onnx_staleness(fp32) is None
    assert onnx_staleness(fp32, parent_required=True) == (
        f"{fp32} cannot be matched to its parent: {ckpt} not found")
    gone = tmp_path / "gone.pt"
    assert onnx_staleness(fp32, gone, parent_required=True) == f"{fp32} cannot be matched to its parent: {gone} not found"
    orphan = write_onnx(tmp_path / "orphan.onnx", None)  # records no parent at all
    assert onnx_staleness(orphan) is None
    assert onnx_staleness(orphan, parent_required=True) == (
        f"{orphan} cannot be matched to its parent: its parent not found")
    folder = tmp_path / "a-folder.pt"
    folder.mkdir()
    assert onnx_staleness(fp32, folder, parent_required=True).endswith(f"{folder} not found")


def test_a_recorded_parent_without_sha256(chain, tmp_path):
    ckpt, _, _ = chain
    nosha = write_onnx(tmp_path / "nosha.onnx", ckpt, sha="")
    assert onnx_staleness(nosha) is None
    assert onnx_staleness(nosha, parent_required=True) == (
        f"{nosha} records no parent sha256, so it cannot be matched to {ckpt}; export it again")


def test_a_missing_precision_means_fp32(chain, tmp_path):
    ckpt, _, _ = chain
    old = write_onnx(tmp_path / "old.onnx", ckpt, precision=None, sha="0" * 64)
    assert onnx_staleness(old).endswith(f"rebuild it: fcn-deploy export {ckpt} -o {old} --force")


# -- resolve ----------------------------------------------------------------------------------
def test_resolve_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactNotFoundError, match=r"^checkpoint model.pt not found; run `fcn-deploy train -o model.pt` first$"):
        resolve("torch")
    assert resolve("torch", "elsewhere.pt") == Resolved("torch", Path("elsewhere.pt"), "checkpoint", "fp32")
    Path("model.pt").write_bytes(b"w")
    assert resolve("torch", precision="fp16") == Resolved("torch", Path("model.pt"), "checkpoint", "fp16")
    with pytest.raises(UsageError, match="--backend must be one of torch, ort, ort-fp16, ort-int8, ort-int8-cpu, trt, not 'onnx'"):
        resolve("onnx")


def test_resolve_onnx_defaults_and_precision(chain, tmp_path):
    ckpt, fp32, fp16 = chain
    export = fp32.parent
    assert resolve("ort", export_dir=export) == Resolved("ort", fp32, "onnx", "fp32", None)
    assert resolve("ort-fp16", export_dir=export) == Resolved("ort-fp16", fp16, "onnx", "fp16", None)
    assert resolve("ort", export_dir=export, precision="fp32").path == fp32
    with pytest.raises(UsageError, match="^--backend ort runs the fp32 ONNX; use --backend ort-fp16 for fp16$"):
        resolve("ort", export_dir=export, precision="fp16")
    with pytest.raises(UsageError, match="^--backend ort-fp16 runs the fp16 ONNX; use --backend ort-int8 for int8$"):
        resolve("ort-fp16", export_dir=export, precision="int8")
    with pytest.raises(UsageError, match="^--backend ort-fp16 runs the fp16 ONNX$"):  # no backend runs bf16
        resolve("ort-fp16", export_dir=export, precision="bf16")
    empty = tmp_path / "empty"
    with pytest.raises(ArtifactNotFoundError, match=rf"^ONNX model {empty}/fcn.onnx not found; run `fcn-deploy export model.pt -o {empty}/fcn.onnx` first$"):
        resolve("ort", export_dir=empty)
    with pytest.raises(ArtifactNotFoundError, match=rf"^FP16 ONNX model {empty}/fcn.fp16.onnx not found; "
                                                   rf"run `fcn-deploy export model.pt -o {empty}/fcn.onnx --fp16` first$"):
        resolve("ort-fp16", export_dir=empty)
    explicit = tmp_path / "nowhere.onnx"  # an explicit artifact that does not exist: the runner says so
    assert resolve("ort-fp16", explicit) == Resolved("ort-fp16", explicit, "onnx", "fp16")


def test_resolve_onnx_staleness_along_the_chain(chain, tmp_path):
    ckpt, fp32, fp16 = chain
    export = fp32.parent
    write_onnx(fp32, ckpt, sha="0" * 64)  # fcn.onnx no longer matches model.pt (and fp16 no longer matches it)
    assert "fcn.fp16.onnx is stale" in resolve("ort-fp16", export_dir=export).stale
    write_onnx(fp16, fp32, "fp16")  # the fp16 child is remade: the stale fcn.onnx above it shows through
    assert "fcn.onnx is stale: " in resolve("ort-fp16", export_dir=export).stale
    assert "fcn.onnx is stale" in resolve("ort", export_dir=export).stale
    write_onnx(fp32, ckpt)
    write_onnx(fp16, fp32, "fp16")
    assert resolve("ort-fp16", export_dir=export, checkpoint=ckpt).stale is None
    other = tmp_path / "other.pt"
    other.write_bytes(b"the checkpoint check names")
    assert f"fcn.onnx is stale for {other}: it was made from {ckpt}" in resolve("ort-fp16", export_dir=export, checkpoint=other).stale
    assert f"fcn.onnx is stale for {other}: it was made from {ckpt}" in resolve("ort", export_dir=export, checkpoint=other).stale
    fp32.unlink()  # the fp16 child alone: fine for a user, not for check with its checkpoint
    assert resolve("ort-fp16", export_dir=export).stale is None
    assert resolve("ort-fp16", export_dir=export, checkpoint=ckpt).stale == (
        f"{fp16} cannot be matched to its parent: {fp32} not found")  # the path it records


def test_a_foreign_onnx_is_left_to_the_runner_only_when_named(chain, tmp_path):
    _, fp32, _ = chain
    write_onnx(fp32, None, meta=False)  # no fcn-deploy metadata
    assert resolve("ort", fp32) == Resolved("ort", fp32, "onnx", "fp32")
    with pytest.raises(ArtifactReadError, match="carries no fcn-deploy metadata"):
        resolve("ort", export_dir=fp32.parent)


# -- engines ----------------------------------------------------------------------------------
FACTS = {"trt": {"rtx": "1.7.1.116", "tensorrt": None},
         "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0"}, "gpu_error": None}


def write_engine(folder: Path, source: Path, sha: str) -> Path:
    from fcn_deploy.trt.sidecar import ENGINE_FORMAT, ENGINE_FORMAT_VERSION, sidecar_path

    folder.mkdir(parents=True, exist_ok=True)
    engine = folder / "fcn.fp16.engine"
    engine.write_bytes(b"plan")
    sidecar_path(engine).write_text(json.dumps({
        "format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION, "precision": "fp16",
        "trt": {"flavour": "rtx", "version": "1.7.1.116"},
        "target": {"portable": True, "compute_capabilities": ["9.0"], "gpu": None},
        "parent": {"path": str(source), "sha256": sha}, "source": {"path": str(source), "sha256": sha}}))
    return engine


def test_resolve_engine(chain, tmp_path, monkeypatch):
    import fcn_deploy.trt.sidecar as sidecar

    monkeypatch.setattr(sidecar, "machine_facts", lambda *a, **k: FACTS)  # this machine has no GPU
    ckpt, fp32, _ = chain
    export, engines = fp32.parent, tmp_path / "engines"
    named = tmp_path / "mine.engine"
    assert resolve("trt", named, precision="fp32") == Resolved("trt", named, "engine", "fp32")
    engine = write_engine(engines, fp32, sha256_file(fp32))
    assert resolve("trt", export_dir=export, engines_dir=engines) == Resolved("trt", engine, "engine", None)
    assert resolve("trt", export_dir=export, engines_dir=engines, checkpoint=ckpt).path == engine
    # check names the checkpoint: an fcn.onnx that does not descend from it makes the engine stale
    other = tmp_path / "other.pt"
    other.write_bytes(b"another checkpoint")
    res = resolve("trt", export_dir=export, engines_dir=engines, checkpoint=other, precision="fp16")
    assert res.path == fp32 and res.kind == "engine" and res.precision == "fp16"
    assert f"fcn.onnx is stale for {other}: it was made from" in res.stale
    # the engine's sidecar names another export: with the checkpoint, fcn.onnx is what counts
    write_engine(engines, tmp_path / "gone.onnx", "0" * 64)
    assert resolve("trt", export_dir=export, engines_dir=engines).path == engine
    with pytest.raises(StaleArtifactError, match="stale: built from an ONNX"):
        resolve("trt", export_dir=export, engines_dir=engines, checkpoint=ckpt)
    with pytest.raises(ArtifactNotFoundError, match=rf"^{tmp_path}/none/fcn.onnx not found, so no engine can be "
                                                   rf"matched to {ckpt} \(run `fcn-deploy export {ckpt}`\)$"):
        resolve("trt", export_dir=tmp_path / "none", engines_dir=engines, checkpoint=ckpt)


def test_a_named_checkpoint_that_is_absent_makes_the_export_unverifiable(chain, tmp_path):
    _, fp32, _ = chain
    gone = tmp_path / "gone.pt"
    assert resolve("ort", export_dir=fp32.parent, checkpoint=gone).stale == (
        f"{fp32} cannot be matched to its parent: {gone} not found")


def test_a_copied_export_folder_is_checked_against_its_own_fp32(chain, tmp_path):
    """The fp16 ONNX's parent is the fcn.onnx beside it, not the path its metadata recorded."""
    import shutil

    ckpt, fp32, _ = chain
    copy = tmp_path / "copy"
    shutil.copytree(fp32.parent, copy)
    write_onnx(fp32, ckpt, sha="1" * 64)  # the original folder's fcn.onnx changes
    assert resolve("ort-fp16", export_dir=copy).stale is None
    assert "fcn.fp16.onnx is stale" in resolve("ort-fp16", export_dir=fp32.parent).stale


def test_an_fp16_onnx_alone_is_checked_against_the_fp32_it_records(chain, tmp_path):
    ckpt, fp32, fp16 = chain
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "fcn.fp16.onnx").write_bytes(fp16.read_bytes())
    assert resolve("ort-fp16", export_dir=alone).stale is None
    write_onnx(fp32, ckpt, sha="1" * 64)  # the recorded fcn.onnx (not beside it) changes
    assert f"fcn.fp16.onnx is stale: {fp32} has changed since" in resolve("ort-fp16", export_dir=alone).stale


def test_an_fp16_onnx_with_a_named_checkpoint_that_is_absent(chain, tmp_path):
    _, fp32, _ = chain
    gone = tmp_path / "gone.pt"
    assert resolve("ort-fp16", export_dir=fp32.parent, checkpoint=gone).stale == (
        f"{fp32} cannot be matched to its parent: {gone} not found")


def test_resolve_engine_with_an_absent_checkpoint_and_a_precision(chain, tmp_path, monkeypatch):
    import fcn_deploy.trt.sidecar as sidecar
    from fcn_deploy.errors import EngineError

    monkeypatch.setattr(sidecar, "machine_facts", lambda *a, **k: FACTS)
    ckpt, fp32, _ = chain
    export, engines = fp32.parent, tmp_path / "engines"
    engine = write_engine(engines, fp32, sha256_file(fp32))
    gone = tmp_path / "gone.pt"
    res = resolve("trt", export_dir=export, engines_dir=engines, checkpoint=gone)
    assert res == Resolved("trt", fp32, "engine", None, f"{fp32} cannot be matched to its parent: {gone} not found")
    assert resolve("trt", export_dir=export, engines_dir=engines, precision="fp16") == (
        Resolved("trt", engine, "engine", "fp16"))
    with pytest.raises(EngineError, match="fcn.fp16.engine: fp16 engine, fp32 asked for"):
        resolve("trt", export_dir=export, engines_dir=engines, precision="fp32")


def test_rebuild_commands_name_the_export_that_remakes_each_artifact():
    """The command a stale artifact's message gives: fp32 from its checkpoint; derived ONNX from a
    re-export beside the fp32 one, int8 with calibration images, the uint8 form by its own flag."""
    from fcn_deploy.chain import _rebuild_command, int8_cpu_onnx_path

    assert int8_cpu_onnx_path("out/net.onnx") == Path("out/net.int8-cpu.onnx")
    ckpt, fp32 = Path("m/model.pt"), Path("out/net.onnx")
    assert _rebuild_command(fp32, {}, ckpt) == "fcn-deploy export m/model.pt -o out/net.onnx --force"
    assert _rebuild_command(fp32, {"precision": "fp32"}, ckpt) == "fcn-deploy export m/model.pt -o out/net.onnx --force"
    assert _rebuild_command(Path("out/net.fp16.onnx"), {"precision": "fp16"}, fp32) == (
        "fcn-deploy export <checkpoint> -o out/net.onnx --fp16 --force")
    calib = " --voc-root DIR (or --calib PHOTOS) --force"
    for meta in ({"precision": "int8"}, {"precision": "int8", "calibration": {"symmetric": True}}):
        assert _rebuild_command(Path("out/net.int8.onnx"), meta, fp32) == (
            "fcn-deploy export <checkpoint> -o out/net.onnx --int8" + calib)
    meta = {"precision": "int8", "calibration": {"symmetric": False}}
    assert _rebuild_command(Path("out/net.int8-cpu.onnx"), meta, fp32) == (
        "fcn-deploy export <checkpoint> -o out/net.onnx --int8-cpu" + calib)


def test_build_hint_names_the_checkpoint_and_export_folder_of_the_call(tmp_path):
    """issue 24: the demo's check named `fcn-deploy export model.pt --int8 ...`; its checkpoint is
    demo-work/model.pt and its export folder demo-work/export."""
    ckpt, export = tmp_path / "demo-work" / "model.pt", tmp_path / "demo-work" / "export"
    with pytest.raises(ArtifactNotFoundError, match=re.escape(
            f"run `fcn-deploy export {ckpt} -o {export}/fcn.onnx --int8 --voc-root DIR (or --calib PHOTOS)` first")):
        resolve("ort-int8", export_dir=export, checkpoint=ckpt)
    with pytest.raises(ArtifactNotFoundError, match=re.escape(f"run `fcn-deploy export {ckpt} -o {export}/fcn.onnx` first")):
        resolve("ort", export_dir=export, checkpoint=ckpt)
