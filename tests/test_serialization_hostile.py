"""Hostile input: files, manifests and layers that must be refused with a message, never
crash the kernels, allocate without bound, or run code."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

from lowbit.models import MLP, MnistCNN
from lowbit.ptq import quantize_dynamic, quantize_weight_only
from lowbit.serialization import LoadError, describe, load, read_manifest, save


# ------------------------------------------------------------------ conv geometry at quantization
@pytest.mark.parametrize("kwargs, field", [
    ({"padding": -1}, "padding"), ({"padding": 5000}, "pre_pad"), ({"stride": 0}, "stride"),
    ({"dilation": 0}, "dilation"), ({"padding": (1, -2)}, "padding")])
@pytest.mark.parametrize("quantize", [quantize_dynamic,
                                      lambda m: quantize_weight_only(m, bits=4, group_size=9)],
                         ids=["int8", "int4"])
def test_quantization_refuses_bad_conv_geometry(kwargs: dict, field: str, quantize) -> None:
    """The C kernels index memory by these sizes (padding=-1 corrupted the heap): refused."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, **kwargs))
    with pytest.raises(ValueError, match=rf"Conv2d.*: {field}=.* must "):
        quantize(model)


def test_quantization_keeps_legitimate_geometries() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=2, dilation=1, groups=2),
                          nn.Conv2d(6, 6, 3, padding="same", dilation=3, padding_mode="reflect"),
                          nn.Conv2d(6, 4, 5, stride=2, padding=4))
    x = torch.randn(1, 4, 12, 12)
    q = quantize_dynamic(model)
    assert torch.nn.functional.cosine_similarity(q(x).flatten(), model(x).flatten(), 0) > 0.99


# ------------------------------------------------------------------ edited manifests at load
def _rewrite(path: Path, edit: Callable[[dict], None]) -> None:
    """Edit the saved manifest (the embedded one, which load uses, and the lowbit.json copy)
    and recompute its checksum exactly as lowbit.save does: what an attacker can do."""
    target = path / "model.safetensors"
    tensors = safetensors.torch.load_file(target)
    manifest = read_manifest(path)
    edit(manifest)
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    manifest["manifest_sha256"] = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    safetensors.torch.save_file(tensors, target, {"lowbit": json.dumps(manifest)})
    (path / "lowbit.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def saved_cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hostile") / "cnn"
    save(quantize_dynamic(MnistCNN().eval()), path)
    return path


@pytest.fixture
def cnn_copy(saved_cnn: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved_cnn, tmp_path / "cnn")
    return tmp_path / "cnn"


def _set(*keys: str, value: Any) -> Callable[[dict], None]:
    def edit(manifest: dict) -> None:
        node = manifest
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


def _delete(*keys: str) -> Callable[[dict], None]:
    def edit(manifest: dict) -> None:
        node = manifest
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]
    return edit


GEO = ("modules", "conv2", "meta", "geometry")
META = ("modules", "fc1", "meta")


def _refused(path: Path, match: str) -> None:
    """Refused at load with a ValueError (LoadError), the float skeleton left untouched."""
    skeleton = MnistCNN()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(LoadError, match=match) as info:
        load(path, model=skeleton)
    assert isinstance(info.value, ValueError)
    assert type(skeleton.conv2) is nn.Conv2d and type(skeleton.fc1) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())


@pytest.mark.parametrize("edit, match", [
    (_set(*GEO, "padding", value=[-1, -1]), r"module 'conv2' \(QuantizedConv2d\): padding="
                                            r"\[-1, -1\] must hold 2 integers, each >= 0"),
    (_set(*GEO, "padding", value=[4000, 4000]), r"'conv2'.*padding=\[4000, 4000\] must .*<= "
                                                r"dilation \* \(kernel_size - 1\) = \[2, 2\]"),
    (_set(*GEO, "dilation", value=[0, 0]), r"'conv2'.*dilation=\[0, 0\] must hold 2 integers "
                                           r">= 1"),
    (_set(*GEO, "dilation", value=[5000, 1]), r"'conv2'.*dilation=\[5000, 1\] must keep"),
    (_set(*GEO, "stride", value=[0, 0]), r"'conv2'.*stride=\[0, 0\] must hold 2 integers in "
                                         r"1\.\.4096"),
    (_set(*GEO, "groups", value=0), r"'conv2'.*groups=0 must be a positive integer dividing "
                                    r"in_channels=16 and out_channels=32"),
    (_set(*GEO, "groups", value=3), r"'conv2'.*groups=3 must"),
    (_set(*GEO, "groups", value="1"), r"'conv2'.*groups='1' must"),
    (_set(*GEO, "pre_pad", value=[1, 1]), r"'conv2'.*pre_pad=\[1, 1\] must be None or hold 4"),
    (_set(*GEO, "pre_pad", value=[1, 1, 1, 2**40]), r"'conv2'.*pre_pad=.* each in 0\.\.4096"),
    (_set(*GEO, "pad_mode", value="evil"), r"'conv2'.*pad_mode='evil' must be one of"),
    (_set(*GEO, "fused_maxpool", value=-2), r"'conv2'.*fused_maxpool=-2 must"),
    (_set(*GEO, "shell", value="rm -rf"), r"'conv2'.*unknown \['shell'\]"),
    (_set("modules", "conv2", "meta", "kernel_size", value=[0, 3]), r"kernel_size=\[0, 3\] "
                                                                    r"must hold 2 positive"),
    (_set("modules", "conv2", "meta", "in_channels", value=-16), r"in_channels=-16 must be a "
                                                                 r"positive integer"),
    (_set("modules", "conv2", "meta", "geometry", value=None), r"'conv2'.*field 'geometry' "
                                                               r"must be dict, got None"),
    ])
def test_hostile_conv_geometry_is_refused(cnn_copy: Path, edit, match: str) -> None:
    _rewrite(cnn_copy, edit)
    _refused(cnn_copy, match)


@pytest.mark.parametrize("edit, match", [
    (_delete(*META, "in_features"), r"module 'fc1' \(QuantizedLinear\): field 'in_features' "
                                    r"is missing"),
    (_set(*META, "in_features", value="1568"), r"'fc1'.*field 'in_features' must be int, got "
                                               r"'1568'"),
    (_set(*META, "in_features", value=True), r"'fc1'.*'in_features' must be int, got True"),
    (_set(*META, "out_features", value=0), r"'fc1'.*'out_features'=0 must be in 1\.\."),
    (_set(*META, "out_features", value=10**12), r"'fc1'.*'out_features'=10+ must be in"),
    (_set(*META, "out_features", value=1 << 30), r"module 'fc1' \(QuantizedLinear\) describes "
                                                 r"a weight of shape \[1073741824, 1568\], but "
                                                 r"the file stores 200704 bytes"),
    (_set(*META, "bias", value="yes"), r"'fc1'.*field 'bias' must be bool"),
    (_set(*META, "mode", value="weight_only"), r"'fc1'.*field 'mode'='weight_only' must be "
                                               r"'dynamic' or 'static'"),
    (_set(*META, "weight_spec", "bits", value=99), r"'fc1'.*field 'weight_spec' is not a valid "
                                                   r"QuantSpec .*bits=99"),
    (_set(*META, "weight_spec", "signed", value="no"), r"'fc1'.*field 'signed' must be bool"),
    (_set(*META, "weight_spec", value=[8]), r"'fc1'.*field 'weight_spec' must be dict"),
    (_delete(*META, "activation_spec"), r"'fc1'.*field 'activation_spec' is missing"),
    (_set(*META, "dtype", value="load"), r"'fc1'.*field 'dtype'='load' must be one of"),
    (_set(*META, "class", value="os.system"), r"'fc1' is a 'os.system', which this lowbit"),
    (_set(*META, "class", value=None), r"'fc1'.*field 'class' must be str"),
    (_delete("modules", "fc1", "meta"), r"'fc1'.*field 'meta' is missing"),
    (_set("modules", "fc1", value=["quantized"]), r"'fc1'.*entry must be an object"),
    (_set("modules", "fc1", "kind", value="exec"), r"'fc1'.*unknown kind 'exec'"),
    (_set("modules", "bn1", "class", value="BatchNorm2d"), r"'bn1'.*replacement class"),
    (_set("modules", value=[]), r"manifest: field 'modules' must be dict"),
    (_delete("modules"), r"manifest: field 'modules' is missing"),
    (_set("architecture", value="x"), r"manifest: field 'architecture' must be dict"),
    (_set("architecture", "factory_kwargs", value=[1]), r"field 'factory_kwargs' must be dict"),
    (_set("narrowed", "fc1.weight_zero_point", value="float64"), r"narrowed\["
                                                                 r"'fc1.weight_zero_point'\]"),
    (_set("narrowed", "nope", value="int32"), r"narrowed\['nope'\] names no stored tensor"),
    (_set("narrowed", "fc1.bias", value="int32"), r"narrowed\['fc1.bias'\]: the stored "
                                                  r"tensor is torch.float32, not the int8"),
    (_set("aliases", "fc2.bias", value="nope"), r"aliases\['fc2.bias'\] names no stored"),
    ])
def test_malformed_manifest_is_refused_by_name(cnn_copy: Path, edit, match: str) -> None:
    _rewrite(cnn_copy, edit)
    _refused(cnn_copy, match)


def test_edited_manifest_describe_is_refused_too(cnn_copy: Path) -> None:
    _rewrite(cnn_copy, _set(*GEO, "padding", value=[-1, -1]))
    with pytest.raises(LoadError, match=r"'conv2'.*padding="):
        describe(cnn_copy)


def test_unedited_copy_loads(cnn_copy: Path) -> None:
    """The rewrite itself is faithful: a no-op edit loads and runs."""
    _rewrite(cnn_copy, lambda manifest: None)
    model = load(cnn_copy, model=MnistCNN())
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_hostile_lora_rank_is_refused(tmp_path: Path) -> None:
    from lowbit.lora import add_lora

    torch.manual_seed(0)
    q = add_lora(quantize_dynamic(MLP(hidden=(32,)).eval()), r=4, target_modules=["layers.0"])
    save(q, tmp_path / "lora")
    _rewrite(tmp_path / "lora", _set("modules", "layers.0", "lora", "r", value=1 << 28))
    with pytest.raises(LoadError, match=r"'layers.0': its LoRA rank r=268435456 does not match "
                                        r"the stored lora_A \[4, 784\]"):
        load(tmp_path / "lora", model=MLP(hidden=(32,)))
    _rewrite(tmp_path / "lora", _set("modules", "layers.0", "lora", "alpha", value=math.inf))
    with pytest.raises(LoadError, match=r"'layers.0' LoRA adapter: field 'alpha' must be "
                                        "finite"):
        load(tmp_path / "lora", model=MLP(hidden=(32,)))


# ------------------------------------------------------------------ garbage and huge files
def test_huge_garbage_file_is_refused_before_reading_it(tmp_path: Path) -> None:
    """A 1 TiB (sparse) file of garbage: refused from its first 8 bytes, with a message (reading
    it whole raised a MemoryError without one)."""
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(b"\xff" * 8)
        f.truncate(1 << 40)
    for call in (lambda: load(path, model=MnistCNN()), lambda: read_manifest(path),
                 lambda: describe(path)):
        with pytest.raises(LoadError, match=r"not a safetensors file \(its first 8 bytes "
                                            r"declare a header of 18446744073709551615 bytes"):
            call()


def test_header_longer_than_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes((5000).to_bytes(8, "little") + b"{}")
    with pytest.raises(LoadError, match="header would need 5000 bytes, the file has 10"):
        load(path, model=MnistCNN())


def test_header_above_the_safetensors_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big_header.safetensors"
    with open(path, "wb") as f:
        f.write((200_000_000).to_bytes(8, "little"))
        f.truncate(300_000_000)
    with pytest.raises(LoadError, match="more than the 100000000 safetensors allows"):
        read_manifest(path)


@pytest.mark.parametrize("metadata", [{"lowbit": "[1, 2]"}, {"lowbit": "not json"}])
def test_manifest_that_is_not_an_object_is_refused(tmp_path: Path, metadata: dict) -> None:
    path = tmp_path / "odd.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, path, metadata)
    with pytest.raises(LoadError, match=r"not a lowbit manifest|manifest is corrupted"):
        load(path, model=nn.Linear(2, 1))


@pytest.mark.parametrize("field, value, match", [
    ("padding", [-3], r"padding=\[-3\] must hold 1 integers"),
    ("fused_maxpool", 2, r"fused_maxpool=2 must .*2-d convs only"),
    ("pre_pad", [1, 1, 1, 1], r"pre_pad=\[1, 1, 1, 1\] must be None or hold 2"),
    ("groups", 4, r"groups=4 must be a positive integer dividing in_channels=6")])
def test_hostile_weight_only_conv1d_geometry_is_refused(tmp_path: Path, field: str, value: Any,
                                                        match: str) -> None:
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(6, 8, 3, padding=1), nn.ReLU())

    save(quantize_weight_only(model(), bits=4, group_size=6), tmp_path / "c1")
    _rewrite(tmp_path / "c1", _set("modules", "0", "meta", "geometry", field, value=value))
    with pytest.raises(LoadError, match=r"module '0' \(WeightOnlyConv1d\): " + match):
        load(tmp_path / "c1", model=model())
