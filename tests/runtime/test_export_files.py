"""Every file the runtime reads is one the manifest vouches for (listed, inside the folder,
hashed), checked by our own code whatever the onnxruntime/onnx version; files that are
vouched for but unusable are errors naming them, at load."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from runtime.engine import OnnxFlamingo
from runtime.generation import GenerationConfig
from runtime.manifest import MANIFEST_NAME, ORT_MEMORY_LOCATION, ManifestError, load_manifest
from runtime.onnx_external import OnnxFormatError, external_tensors
from runtime.pipeline import FlamingoPipeline


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("images")
    path = folder / "0.png"
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    return [str(path)]


def _copy(tiny_export, tmp_path: Path, family: str = "llama") -> Path:
    out = tmp_path / "e"
    shutil.copytree(tiny_export(family), out)
    return out


def _rehash(out: Path, edit=None) -> None:
    """Rewrite the manifest with fresh sha256s (as a re-export would): only our other checks
    stand between the edited files and the runtime."""
    m = json.loads((out / MANIFEST_NAME).read_text())
    if edit is not None:
        edit(m)
    for name in m["files"]:
        m["files"][name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    (out / MANIFEST_NAME).write_text(json.dumps(m))


def _externalize(out: Path, location: str, payload_file: Path | None = None) -> str:
    """Move vision.onnx's largest initializer to external data at `location` (bytes written
    to `payload_file`, default out/location); returns the tensor name."""
    model = onnx.load(str(out / "vision.onnx"))
    t = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (payload_file or out / location).write_bytes(t.raw_data)
    size = len(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(out / "vision.onnx"))
    return t.name


def test_external_tensors_reads_what_onnx_reads(tiny_export, tmp_path) -> None:
    """Our protobuf walk finds the same external tensors as onnx itself, in initializers and
    in node attributes inside subgraphs; a self-contained graph has none."""
    assert external_tensors(tiny_export("mpt") / "decoder.onnx") == []
    model = onnx.load(str(tiny_export("mpt") / "vision.onnx"))
    then = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(
            np.arange(64, dtype=np.float32), "deep"))],
        "then", [], [onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [64])],
    )  # fmt: skip
    cond = onnx.numpy_helper.from_array(np.array(True), "cond")
    model.graph.initializer.append(cond)
    model.graph.node.append(
        onnx.helper.make_node("If", ["cond"], ["unused"], then_branch=then, else_branch=then)
    )
    path = tmp_path / "m.onnx"
    onnx.external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="w.bin", size_threshold=0,
        convert_attribute=True,
    )  # fmt: skip
    onnx.save(model, str(path))
    ours = {(t.tensor, t.location, t.offset, t.length) for t in external_tensors(path)}
    theirs = set()
    skeleton = onnx.load(str(path), load_external_data=False)
    for t in onnx.external_data_helper._get_all_tensors(skeleton):
        if onnx.external_data_helper.uses_external_data(t):
            info = {e.key: e.value for e in t.external_data}
            theirs.add((t.name, info["location"], info.get("offset"), info.get("length")))
    assert ours == theirs and len(ours) > 2
    assert any(name == "deep" for name, *_ in ours)  # the If branch's Constant
    for content, words in ((b"", "empty file"), (path.read_bytes()[:1000], "past the end")):
        path.write_bytes(content)
        with pytest.raises(OnnxFormatError, match=words):
            external_tensors(path)


def test_listed_external_data_loads_and_runs_the_same(tiny_export, images, tmp_path) -> None:
    out = _copy(tiny_export, tmp_path)
    config = GenerationConfig(max_new_tokens=4)
    before = FlamingoPipeline(out).generate("<image>A red", [images[0]], config)
    _externalize(out, "vision.onnx.data")

    def listed(m):
        m["graphs"]["vision"]["external_data"] = ["vision.onnx.data"]
        m["files"]["vision.onnx.data"] = ""

    _rehash(out, listed)
    after = FlamingoPipeline(out).generate("<image>A red", [images[0]], config)
    assert after.token_ids == before.token_ids
    assert np.allclose(after.logprobs, before.logprobs, atol=1e-6)


@pytest.mark.parametrize("how", ["unlisted", "relative", "absolute", "symlink", "ort-memory",
                                 "beyond-the-file"])  # fmt: skip
def test_external_data_outside_the_manifest_is_refused(tiny_export, tmp_path, how) -> None:
    """rel-09/rel-10's kind: external data the manifest does not hash, or outside the folder,
    is refused by our check (naming graph, tensor, location) before onnxruntime opens it."""
    out = _copy(tiny_export, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    location = {"unlisted": "weights.bin", "relative": "../outside/secret.bin",
                "absolute": str(secret), "symlink": "link.bin",
                "ort-memory": ORT_MEMORY_LOCATION, "beyond-the-file": "w.bin"}[how]  # fmt: skip
    payload = None if how in ("unlisted", "beyond-the-file") else secret
    if how == "symlink":
        (out / "link.bin").symlink_to(secret)
    tensor = _externalize(out, location, payload)
    if how == "beyond-the-file":  # listed and hashed, but the tensor reads past its end
        (out / "w.bin").write_bytes((out / "w.bin").read_bytes()[:10])

        def listed(m):
            m["graphs"]["vision"]["external_data"] = ["w.bin"]
            m["files"]["w.bin"] = ""

        _rehash(out, listed)
    else:
        _rehash(out)
    words = {
        "unlisted": "is not listed in graphs.vision.external_data",
        "ort-memory": "not a file location",
        "beyond-the-file": "lie outside the file",
    }
    with pytest.raises(ManifestError) as info:
        load_manifest(out)
    message = str(info.value)
    assert f"vision.onnx: tensor {tensor!r} external data {location!r}" in message, message
    assert words.get(how, "is outside the export folder") in message


def test_tokenizer_files_must_be_hashed(tiny_export, images, tmp_path) -> None:
    """rel-09's other instance: the runtime reads tokenizer/tokenizer.json only through the
    manifest, which must list and hash it."""
    out = _copy(tiny_export, tmp_path)
    m = json.loads((out / MANIFEST_NAME).read_text())
    unhashed = json.loads(json.dumps(m))
    del unhashed["files"]["tokenizer/tokenizer.json"]
    (out / MANIFEST_NAME).write_text(json.dumps(unhashed))
    with pytest.raises(ManifestError, match=r"tokenizer/tokenizer\.json' is used by the runtime"):
        FlamingoPipeline(out)
    unlisted = json.loads(json.dumps(m))
    unlisted["tokenizer_files"].remove("tokenizer/tokenizer.json")
    (out / MANIFEST_NAME).write_text(json.dumps(unlisted))
    with pytest.raises(ManifestError, match="tokenizer_files does not list"):
        FlamingoPipeline(out)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "tokenizer", "dtype-lie",
                                    "shape-lie"])  # fmt: skip
def test_unusable_files_are_errors_naming_them_at_load(tiny_export, tmp_path, damage) -> None:
    """rel-08's kind: files that pass the sha256 check (re-hashed) but cannot be used."""
    out = _copy(tiny_export, tmp_path)
    decoder = out / "decoder.onnx"
    if damage == "truncated":
        decoder.write_bytes(decoder.read_bytes()[: decoder.stat().st_size // 2])
    elif damage == "empty":
        decoder.write_bytes(b"")
    elif damage == "garbage":  # parses as a protobuf of no known fields: onnxruntime refuses
        decoder.write_bytes(b"\x00" * 64)
    elif damage == "tokenizer":
        (out / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')

    def lie(m):
        if damage == "dtype-lie":
            m["graphs"]["vision"]["io"]["outputs"][0]["dtype"] = "float16"
            m["graphs"]["vision"]["io"]["inputs"][0]["dtype"] = "float16"
        if damage == "shape-lie":  # a symbolic axis the graph has fixed: dims agree, names not
            m["graphs"]["decoder"]["io"]["inputs"][0]["shape"] = ["batch", 7]

    _rehash(out, lie)
    where = {"tokenizer": "tokenizer/tokenizer.json: not a usable tokenizer",
             "dtype-lie": "vision.onnx: pixel_values is tensor(float) in the graph, the manifest "
                          "says float16",
             "shape-lie": "graphs.decoder.io.inputs[0] (input_ids): shape"}  # fmt: skip
    with pytest.raises(ManifestError) as info:
        FlamingoPipeline(out)
    assert where.get(damage, "decoder.onnx: not a loadable ONNX model") in str(info.value)


def test_session_shapes_checked_at_load(tiny_export) -> None:
    """A session whose fixed dims differ from the spec is refused at load (not at run)."""
    engine = OnnxFlamingo(tiny_export("mpt"))
    real = engine.sessions["vision"]

    class Arg:
        def __init__(self, arg, shape):
            self.name, self.type, self.shape = arg.name, arg.type, shape

    class Lying:
        def get_inputs(self):
            (arg,) = real.get_inputs()
            return [Arg(arg, [arg.shape[0], 3, 224, 224])]

        def get_outputs(self):
            return real.get_outputs()

    from runtime.engine import check_session_io

    with pytest.raises(ManifestError, match=r"pixel_values has shape .*224.*the manifest says"):
        check_session_io(Lying(), engine.vision_spec, "vision.onnx")
    check_session_io(real, engine.vision_spec, "vision.onnx")


def test_engines_json_read_like_the_manifest(tiny_export, tmp_path) -> None:
    """engines.json (TensorRT engines beside the export) is read strictly and from inside the
    folder too."""
    from runtime.engines import ENGINES_NAME, EngineMismatchError, load_engines_manifest

    out = _copy(tiny_export, tmp_path)
    for content, words in ((b"\xff{", "not UTF-8"), (b"[]", "not a JSON object"),
                           (b'{"schema_version": NaN}', "invalid JSON")):  # fmt: skip
        (out / ENGINES_NAME).write_bytes(content)
        with pytest.raises(EngineMismatchError, match=rf"{ENGINES_NAME}: .*{words}"):
            load_engines_manifest(out)
    (out / ENGINES_NAME).unlink()
    (tmp_path / "elsewhere.json").write_text("{}")
    (out / ENGINES_NAME).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(EngineMismatchError, match="resolves outside the export folder"):
        load_engines_manifest(out)
