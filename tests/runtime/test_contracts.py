"""The runtime's contracts (runtime/contracts.py) hold for every implementation: the onnxruntime
and TensorRT (stand-in) engines, their step models and the PyTorch reference's, which agree on
logits and cache; OnnxFlamingo makes every graph's session with its session factory."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from flamingo.generate import TorchStepModel
from precision.parity import TorchBackend
from runtime.contracts import DecoderStepModel, Engine, Session
from runtime.decoding import rows_cross_kv
from runtime.engine import OnnxFlamingo, ort_session_factory
from runtime.manifest import ManifestError
from tests.trt.stand_in import fake_build, stand_in_engine


def _members(protocol: type) -> dict[str, Any]:
    """Every member a protocol declares, its own and its base protocols': name -> declaration
    (None for a plain annotation)."""
    out: dict[str, Any] = {}
    for cls in reversed(protocol.__mro__):
        if not getattr(cls, "_is_protocol", False) or cls.__module__ == "typing":
            continue
        out.update({n: None for n in getattr(cls, "__annotations__", {})})
        out.update(vars(cls))
    return {n: v for n, v in out.items() if not n.startswith("_")}


def assert_implements(obj: object, protocol: type) -> None:
    """isinstance (runtime_checkable), then each member by name, each method accepting the
    protocol's parameters by name."""
    assert isinstance(obj, protocol), f"{type(obj).__name__} does not implement {protocol.__name__}"
    for name, declared in _members(protocol).items():
        assert hasattr(obj, name), f"{type(obj).__name__} lacks {protocol.__name__}.{name}"
        if inspect.isfunction(declared):
            wanted = list(inspect.signature(declared).parameters)[1:]  # without self
            given = inspect.signature(getattr(obj, name)).parameters
            missing = [p for p in wanted if p not in given]
            assert not missing, f"{type(obj).__name__}.{name} lacks parameters {missing}"


def test_protocol_members_are_what_the_pipeline_uses() -> None:
    """The helper sees inherited members (the search's two methods in DecoderStepModel)."""
    assert set(_members(DecoderStepModel)) == {
        "step", "reorder_cache", "prefill_end", "past_length", "run", "advance", "past_arrays",
    }  # fmt: skip
    assert {"limits", "step_model", "rows_cross_kv", "performance_notes"} <= set(_members(Engine))


@torch.no_grad()
def test_engines_and_step_models_implement_the_contracts(
    tiny_model, tiny_export, tmp_path: Path
) -> None:
    """onnxruntime, TensorRT (stand-in) and the PyTorch reference: each an Engine / step model
    by the protocols, and the same logits and KV cache after a prefill."""
    model, tok, _, _ = tiny_model("llama")
    export = tiny_export("llama")
    ort_engine = OnnxFlamingo(export)
    trt_engine = stand_in_engine(fake_build(export, tmp_path / "built", max_seq_len=64))
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = np.array([tok("<image>A red<|endofchunk|><image>A")["input_ids"]], dtype=np.int64)
    mask = np.ones_like(ids)
    step_models: dict[str, Any] = {}
    for label, engine in (("onnxruntime", ort_engine), ("tensorrt", trt_engine)):
        assert_implements(engine, Engine)
        cross = engine.rows_cross_kv(engine.encode_images(pixels), [[0, 1]])
        step_models[label] = engine.step_model(cross, np.array([2]))
    vision_x = torch.from_numpy(pixels)[None, :, None]
    step_models["torch"] = TorchStepModel(model, vision_x, np.array([2]))
    logits, past = {}, {}
    for label, step_model in step_models.items():
        assert_implements(step_model, DecoderStepModel)
        assert step_model.prefill_end is None and step_model.past_length == 0
        logits[label] = step_model.step(ids, mask)
        assert step_model.prefill_end is not None and step_model.past_length == ids.shape[1]
        past[label] = step_model.past_arrays()
    for label in ("tensorrt", "torch"):
        assert np.abs(logits[label] - logits["onnxruntime"]).max() < 1e-4, label
        assert past[label].keys() == past["onnxruntime"].keys()
        for name, value in past["onnxruntime"].items():
            assert past[label][name].shape == value.shape == (1, *value.shape[1:])
            assert np.abs(past[label][name] - value).max() < 1e-4, (label, name)


@torch.no_grad()
def test_torch_step_model_from_cross_kv_equals_from_pixels(tiny_model) -> None:
    """Parity's reference (the LM over given image K/V) computes what the pixel path does."""
    model, tok, _, _ = tiny_model("mpt")
    size = model.cfg.vision.image_size
    pixels = np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32)
    ids = np.array([tok("<image>A red<|endofchunk|><image>A")["input_ids"]], dtype=np.int64)
    mask = np.ones_like(ids)
    reference = TorchBackend(model)
    cross = rows_cross_kv(reference.encode(pixels), [[0, 1]], reference.dims, np.float32)
    given = TorchStepModel.from_cross_kv(model, cross, np.array([2]))
    assert_implements(given, DecoderStepModel)
    own = TorchStepModel(model, torch.from_numpy(pixels)[None, :, None], np.array([2]))
    np.testing.assert_allclose(given.run(ids, mask), own.run(ids, mask), rtol=0, atol=1e-6)
    nxt = np.array([[5]], dtype=np.int64)
    mask = np.ones((1, ids.shape[1] + 1), dtype=np.int64)
    np.testing.assert_allclose(given.step(nxt, mask), own.step(nxt, mask), rtol=0, atol=1e-6)


class _Counting:
    """A session wrapper counting runs (what a recording or profiling factory would do)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.runs = 0

    def run(self, output_names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.runs += 1
        return self.session.run(output_names, feed)

    def get_inputs(self) -> list[Any]:
        return self.session.get_inputs()

    def get_outputs(self) -> list[Any]:
        return self.session.get_outputs()


def test_session_factory_makes_every_graphs_session(tiny_export) -> None:
    export = tiny_export("gpt_neox")
    default = ort_session_factory()
    made: dict[str, _Counting] = {}

    def factory(name: str, path: Path) -> _Counting:
        made[name] = _Counting(default(name, path))
        assert isinstance(made[name], Session)
        return made[name]

    engine = OnnxFlamingo(export, session_factory=factory)
    graphs = engine.manifest.graphs
    assert list(made) == list(graphs) == ["vision", "decoder"]
    assert all(engine.sessions[name] is made[name] for name in graphs)
    pixels = np.zeros((1, 3, 32, 32), dtype=np.float32)
    cross = engine.rows_cross_kv(engine.encode_images(pixels), [[0]])
    ids = np.array([[engine.media_token_id, 5, 6]], dtype=np.int64)
    engine.step_model(cross, np.array([1]), io_binding=False).step(ids, np.ones_like(ids))
    assert made["vision"].runs == 1 and made["decoder"].runs == 1
    # a factory's sessions are checked against the manifest's spec like the default's
    swapped = {"vision": "decoder", "decoder": "vision"}
    with pytest.raises(ManifestError, match="graph I/O does not match the manifest spec"):
        OnnxFlamingo(
            export, session_factory=lambda n, p: default(n, p.parent / graphs[swapped[n]].file)
        )
