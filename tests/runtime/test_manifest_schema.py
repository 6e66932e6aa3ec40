"""The manifest's JSON Schema (runtime/manifest.schema.json) is the one definition: our validator
and the `jsonschema` package agree on it, it matches the dataclasses it describes, and every
ill-formed manifest is a ManifestError naming manifest.json and the key."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from flamingo.config import (
    LM_FAMILIES,
    CrossAttentionConfig,
    LMConfig,
    ResamplerConfig,
    VisionConfig,
)
from runtime.images import _INTERPOLATIONS, _RESIZE_MODES, PreprocessConfig
from runtime.manifest import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA,
    PRECISIONS,
    Manifest,
    ManifestError,
    load_manifest,
)
from runtime.schema import SchemaViolation, load_json, validate


@pytest.fixture(scope="module")
def manifest_dict(tiny_export) -> dict[str, Any]:
    return json.loads((tiny_export("llama") / MANIFEST_NAME).read_text())


def _set(d: dict, path: str, value: Any) -> dict:
    d = copy.deepcopy(d)
    *keys, last = path.split(".")
    target = d
    for k in keys:
        target = target[int(k)] if isinstance(target, list) else target[k]
    if value is _DELETE:
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return d


_DELETE = object()

# (path, value, words the error must contain): one key each, every kind of wrong
MUTATIONS = [
    ("files", ["vision.onnx"], "files: expected an object"),
    ("graphs", [1], "graphs: expected an object"),
    ("graphs.vision", _DELETE, "graphs: missing required key 'vision'"),
    ("limits.max_seq_len", _DELETE, "limits: missing required key 'max_seq_len'"),
    ("limits.max_seq_len", "lots", "limits.max_seq_len: expected an integer"),
    ("limits.max_images", 0, "limits.max_images: must be >= 1"),
    ("limits.max_seq_len", 2.5, "limits.max_seq_len: expected an integer"),
    ("model", {}, "model: missing required key"),
    ("model.lm.family", "gpt2", "model.lm.family: expected one of"),
    ("model.lm.num_layers", True, "model.lm.num_layers: expected an integer"),
    ("special_tokens.media_token_id", "394", "special_tokens.media_token_id: expected an integer"),
    ("special_tokens.eoc_token_id", -5, "special_tokens.eoc_token_id: must be >= 0"),
    ("special_tokens.media_token_id", _DELETE, "missing required key 'media_token_id'"),
    ("quantization", "yes", "quantization: expected an object"),
    ("quantization", {"decoder": {"backends": ["cuda"]}}, "quantization.decoder.backends[0]"),
    ("preprocess.std", [1, 1], "preprocess.std: must have at least 3 items"),
    ("preprocess.interpolation", "lanczos", "preprocess.interpolation: expected one of"),
    ("graphs.decoder.precision", "int3", "graphs.decoder.precision: expected one of"),
    ("graphs.vision.io.inputs.0.dtype", "float8", "graphs.vision.io.inputs[0].dtype"),
    ("graphs.vision.io.inputs.0.shape.1", -3, "graphs.vision.io.inputs[0].shape[1]: must be >= 0"),
    ("files.vision.onnx", "abc", None),  # replaced below (a key with a dot)
    ("tokenizer_files", [], "tokenizer_files: must have at least 1 items"),
    ("surprise", 1, "unknown key 'surprise'"),
]


def _mutations(base: dict) -> list[tuple[str, dict, str]]:
    out = []
    for path, value, words in MUTATIONS:
        if path == "files.vision.onnx":
            d = copy.deepcopy(base)
            d["files"]["vision.onnx"] = "abc"
            out.append((path, d, "files.vision.onnx: 'abc' does not match"))
        else:
            out.append((path, _set(base, path, value), words))
    return out


def test_validator_agrees_with_jsonschema(manifest_dict, tmp_path) -> None:
    """Valid: real manifests (fp32, and with a quantization record); invalid: each mutation.
    Our validator and jsonschema (Draft 2020-12) give the same verdict on every one."""
    jsonschema.Draft202012Validator.check_schema(MANIFEST_SCHEMA)
    checker = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)
    quantized = copy.deepcopy(manifest_dict)
    quantized["quantization"] = {"decoder": {"backends": ["onnxruntime"], "mode": "w8a8"},
                                 "source": {"export": "x"}, "calibration": {}}  # fmt: skip
    integral = _set(manifest_dict, "limits.max_images", 8.0)  # JSON Schema: 8.0 is an integer
    for document in (manifest_dict, quantized, integral):
        assert checker.is_valid(document)
        validate(document, MANIFEST_SCHEMA)
    assert validate(integral, MANIFEST_SCHEMA)["limits"]["max_images"] == 8
    assert type(validate(integral, MANIFEST_SCHEMA)["limits"]["max_images"]) is int
    for path, document, _ in _mutations(manifest_dict):
        assert not checker.is_valid(document), path
        with pytest.raises(SchemaViolation):
            validate(document, MANIFEST_SCHEMA)
    for document in ([], None, 42, "x"):
        assert not checker.is_valid(document)
        with pytest.raises(SchemaViolation):
            validate(document, MANIFEST_SCHEMA)


def test_schema_describes_the_dataclasses() -> None:
    """The schema's model/preprocess keys are the config dataclasses' fields, its enums the
    values the code accepts: a field added on one side fails here."""
    model = MANIFEST_SCHEMA["properties"]["model"]["properties"]
    for key, cls in (("vision", VisionConfig), ("lm", LMConfig), ("resampler", ResamplerConfig),
                     ("cross_attn", CrossAttentionConfig)):  # fmt: skip
        assert set(model[key]["properties"]) == {f.name for f in fields(cls)}, key
    assert model["lm"]["properties"]["family"]["enum"] == list(LM_FAMILIES)
    pre = MANIFEST_SCHEMA["properties"]["preprocess"]["properties"]
    assert set(pre) == {f.name for f in fields(PreprocessConfig)}
    assert set(pre["interpolation"]["enum"]) == set(_INTERPOLATIONS)
    assert pre["resize_mode"]["enum"] == list(_RESIZE_MODES)
    graph = MANIFEST_SCHEMA["$defs"]["graph"]["properties"]
    assert graph["precision"]["enum"] == list(PRECISIONS)


def test_every_bad_manifest_names_the_file_and_key(manifest_dict) -> None:
    for path, document, words in _mutations(manifest_dict):
        with pytest.raises(ManifestError) as info:
            Manifest.from_dict(document, "x/manifest.json")
        assert str(info.value).startswith("x/manifest.json: "), str(info.value)
        assert words in str(info.value), (path, str(info.value))
    for document, kind in (([], "list"), (None, "null"), (42, "int")):
        with pytest.raises(ManifestError, match=f"expected a JSON object, got {kind}"):
            Manifest.from_dict(document, "manifest.json")


# what JSON Schema cannot say: values that must agree with each other
CONSISTENCY = [
    ("special_tokens.eoc_token_id", 10**6, "special_tokens.eoc_token_id 1000000 is outside"),
    ("special_tokens.bos_token_id", 10**6, "special_tokens.bos_token_id 1000000 is outside"),
    ("special_tokens.pad_token_id", 0, "special_tokens.pad_token_id 0 differs from model"),
    ("preprocess.image_size", 224, "preprocess.image_size 224 differs from model.vision"),
    ("model.lm.num_layers", 7, "graphs.vision.io.outputs do not match the model config"),
    ("model.vision.image_size", 64, "preprocess.image_size 32 differs"),
    ("graphs.decoder.io.outputs.0.shape.2", 9, "graphs.decoder.io.outputs[0] (logits): shape"),
    ("graphs.decoder.io.inputs.0.dtype", "float32", "inputs[0] (input_ids): dtype float32"),
    ("graphs.vision.file", "other.onnx", "graphs.vision.file 'other.onnx' is used by the runtime"),
    ("graphs.decoder.external_data", ["w.bin"], "graphs.decoder.external_data[0] 'w.bin'"),
    ("tokenizer_files", ["tokenizer/tokenizer_config.json"], "does not list 'tokenizer/tokeni"),
]


@pytest.mark.parametrize(("path", "value", "words"), CONSISTENCY, ids=[c[0] for c in CONSISTENCY])
def test_inconsistent_manifests_are_refused(manifest_dict, path, value, words) -> None:
    document = _set(manifest_dict, path, value)
    if path == "model.vision.image_size":  # the spec follows, the preprocessing does not
        document = _set(document, "graphs.vision.io.inputs.0.shape", ["num_images", 3, 64, 64])
    with pytest.raises(ManifestError, match=r"manifest\.json: ") as info:
        Manifest.from_dict(document)
    assert words in str(info.value)


def test_manifest_file_itself_is_checked(tiny_export, tmp_path) -> None:
    """Not UTF-8, NaN literals, a folder, a symlink out of the export: each a ManifestError
    naming manifest.json; a symlink that stays inside is fine."""
    out = tmp_path / "e"
    shutil.copytree(tiny_export("llama"), out)
    good = (out / MANIFEST_NAME).read_bytes()
    for content, words in ((b"\xff\xfe{", "not UTF-8"), (b"{oops", "invalid JSON"),
                           (good.replace(b'"max_images": 32', b'"max_images": NaN'),
                            "NaN is not a JSON value")):  # fmt: skip
        (out / MANIFEST_NAME).write_bytes(content)
        with pytest.raises(ManifestError, match=f"{MANIFEST_NAME}: .*{words}"):
            load_manifest(out)
    (out / MANIFEST_NAME).unlink()
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes(good)
    (out / MANIFEST_NAME).symlink_to(outside)
    with pytest.raises(ManifestError, match=r"manifest\.json: resolves outside the export folder"):
        load_manifest(out)
    (out / MANIFEST_NAME).unlink()
    (out / "inside.json").write_bytes(good)
    (out / MANIFEST_NAME).symlink_to(out / "inside.json")
    assert load_manifest(out).limits["max_images"] == 32
    (out / MANIFEST_NAME).unlink()
    (out / MANIFEST_NAME).mkdir()
    with pytest.raises(ManifestError, match=r"manifest\.json: not a file"):
        load_manifest(out)
    with pytest.raises(ManifestError, match="not a folder"):
        load_manifest(out / "inside.json")


def test_load_json_refuses_what_json_allows_python(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    for text in ('{"a": Infinity}', '{"a": -Infinity}', "[NaN]"):
        path.write_text(text)
        with pytest.raises(ValueError, match=r"x\.json: invalid JSON"):
            load_json(path)
    with pytest.raises(ValueError, match=r"missing\.json: cannot read"):
        load_json(tmp_path / "missing.json")
