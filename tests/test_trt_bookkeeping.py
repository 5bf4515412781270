"""The pure bookkeeping of fcn_deploy/trt/runtime.py (no TensorRT, no GPU): which engine IO the
runner accepts, the batch it executes and the devices it takes; boundary values of each."""

from __future__ import annotations

import pytest

from fcn_deploy.errors import EngineError, InputMismatchError
from fcn_deploy.trt.runtime import Binding, BatchProfile, binding_table

LOGITS = ("logits", "OUTPUT", (-1, 21, 64, 64), "FLOAT")


@pytest.mark.parametrize("shape", [(-1, -1, 64, 64), (-1, 3, 64, -1), (1, 3, -1, 64), (-1, 3, 64), (-1, 3, 64, 64, 1),
                                   (-1, 4, 64, 64), (-1, 1, 64, 64)])
def test_only_the_batch_of_the_input_may_be_dynamic(shape):
    """Issue 14: a dynamic channel dimension in an engine's input was accepted; an RGB model
    takes exactly 3 channels."""
    with pytest.raises(EngineError, match=rf"^engine input image is float32 \({', '.join(map(str, shape))}\), "
                                          r"expected float32 \(N, 3, H, W\)$"):
        binding_table([("image", "INPUT", shape, "FLOAT"), LOGITS])


def test_fixed_and_dynamic_batch_inputs_are_accepted():
    for shape in ((-1, 3, 64, 64), (4, 3, 64, 64), (1, 3, 1, 1)):
        table = binding_table([("image", "INPUT", shape, "FLOAT"), LOGITS])
        assert table.input == Binding("image", True, shape, "float32")
        assert table.all == [table.input, table.logits] and table.outputs == [table.logits]


def test_outputs_no_input_and_labels():
    with pytest.raises(EngineError, match="^engine has 0 inputs, expected 1$"):
        binding_table([LOGITS])
    with pytest.raises(EngineError, match=r"^engine outputs \['logits', 'scores'\]: expected one 4-D logits output$"):
        binding_table([("image", "INPUT", (-1, 3, 64, 64), "FLOAT"), LOGITS, ("scores", "OUTPUT", (-1, 21, 64, 64), "FLOAT")])
    with pytest.raises(EngineError, match="expected one 4-D logits output"):
        binding_table([("image", "INPUT", (-1, 3, 64, 64), "FLOAT"), ("logits", "OUTPUT", (-1, 21, 4096), "FLOAT")])
    table = binding_table([("labels", "OUTPUT", (-1, 1, 64, 64), "UINT8"), ("image", "INPUT", (-1, 3, 64, 64), "FLOAT"), LOGITS])
    assert table.labels.name == "labels" and not table.labels.is_input and table.logits.name == "logits"
    assert table.outputs == [table.logits, table.labels]
    assert table.buffer_nbytes(2) == {"image": 2 * 3 * 64 * 64 * 4, "logits": 2 * 21 * 64 * 64 * 4,
                                      "labels": 2 * 64 * 64}


def test_batch_profile_boundaries():
    profile = BatchProfile.from_shapes([(2, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8)])
    assert (profile.min, profile.opt, profile.max) == (2, 4, 8)
    assert [profile.run_batch(n) for n in (1, 2, 3, 8)] == [2, 2, 3, 8]
    with pytest.raises(InputMismatchError, match="^trt: received batch 9, the engine's profile allows at most 8$"):
        profile.run_batch(9)
    with pytest.raises(InputMismatchError, match="^trt: received an empty batch$"):
        profile.run_batch(0)
    assert BatchProfile(1, 1, 1).run_batch(1) == 1


def test_host_streams_have_distinct_nonzero_handles():
    """The CPU stand-in of a CUDA stream (fake TensorRT in tests): like a real stream, each has its
    own non-zero handle, so a test can tell the runner's stream from the default one (0)."""
    from fcn_deploy.trt.runtime import _HostStream

    a, b = _HostStream(), _HostStream()
    assert isinstance(a.handle, int) and a.handle != 0 and b.handle != 0 and a.handle != b.handle
