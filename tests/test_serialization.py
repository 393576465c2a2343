"""lowbit.save / lowbit.load: round trips, sizes, integrity, atomicity, plain state dicts."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from lowbit.config import QuantizationConfig
from lowbit.models import MLP, MnistCNN
from lowbit.ptq import PTQQuantizer, quantize_dynamic, quantize_static, quantize_weight_only
from lowbit.serialization import (
    FORMAT_VERSION,
    STALE_TMP_SECONDS,
    LoadError,
    clean_stale_temporaries,
    describe,
    load,
    read_manifest,
    save,
)

SMALL_MLP = {"in_features": 784, "hidden": [64, 32], "num_classes": 10}


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = MnistCNN().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding matters
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model


def _images(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _quantize(method: str, model: nn.Module) -> nn.Module:
    calib = [_images(16, seed=s) for s in range(2)]
    if method == "dynamic":
        return quantize_dynamic(model)
    if method == "static":
        return quantize_static(model, calib, progress=False)
    if method == "int4":
        return quantize_weight_only(model, bits=4, group_size=32)
    if method == "mixed":  # INT8 static convs, INT4 fc1, fc2 kept in FP32
        cfg = QuantizationConfig.int8_static(layer_overrides={
            "fc1": QuantizationConfig.int4_weight_only(group_size=32), "fc2": None})
        return PTQQuantizer(cfg, progress=False).quantize(model, calib)
    raise AssertionError(method)


@pytest.mark.parametrize("method", ["dynamic", "static", "int4", "mixed"])
@pytest.mark.parametrize("single_file", [False, True])
def test_round_trip_is_bit_identical(tmp_path: Path, method: str, single_file: bool) -> None:
    q = _quantize(method, _cnn())
    path = tmp_path / ("m.safetensors" if single_file else "m")
    written = save(q, path)
    assert written.is_file() and written.suffix == ".safetensors"
    assert (path / "lowbit.json").is_file() != single_file
    loaded = load(path, model=MnistCNN())
    x = _images(5, seed=7)
    with torch.inference_mode():
        assert torch.equal(loaded(x), q(x))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in q.modules()]
    assert loaded.lowbit_manifest["format_version"] == FORMAT_VERSION
    assert not loaded.training


@pytest.mark.parametrize("config", [QuantizationConfig.int8_static(),
                                    QuantizationConfig.int8_dynamic(),
                                    QuantizationConfig.int4_weight_only(group_size=32)],
                         ids=["static", "dynamic", "int4"])
def test_qat_converted_round_trip(tmp_path: Path, config: QuantizationConfig) -> None:
    from lowbit.qat import QATConfig, convert_qat, prepare_qat

    qat = prepare_qat(_cnn().train(), QATConfig(quantization=config, learnable_scale=True))
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    for step in range(3):
        opt.zero_grad()
        qat(_images(16, seed=step)).logsumexp(1).mean().backward()
        opt.step()
    q = convert_qat(qat)
    save(q, tmp_path / "qat")
    loaded = load(tmp_path / "qat", model=MnistCNN())
    x = _images(5, seed=9)
    with torch.inference_mode():
        assert torch.equal(loaded(x), q(x))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in q.modules()]
    assert type(loaded.fc1).__name__ == ("Int4Linear" if config.mode == "weight_only"
                                         else "QuantizedLinear")


def test_bfloat16_model_round_trip(tmp_path: Path) -> None:
    """The original dtype is recorded; a bf16 model comes back bf16 and bit-identical."""
    torch.manual_seed(0)
    model = MLP(**SMALL_MLP).to(torch.bfloat16).eval()
    q = quantize_dynamic(model)
    save(q, tmp_path / "bf16")
    manifest = read_manifest(tmp_path / "bf16")
    assert manifest["modules"]["layers.0"]["meta"]["dtype"] == "bfloat16"
    loaded = load(tmp_path / "bf16", model=MLP(**SMALL_MLP).to(torch.bfloat16))
    x = _images(3).to(torch.bfloat16)
    out = loaded(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, q(x))


def test_a_model_on_the_meta_device_is_refused_by_name_and_nothing_is_written(
        tmp_path: Path) -> None:
    q = quantize_dynamic(MLP(**SMALL_MLP).eval()).to("meta")
    with pytest.raises(ValueError, match=r"'layers\.0\.weight' is on the meta device.*to_empty"):
        save(q, tmp_path / "m")
    assert not any(tmp_path.rglob("*.safetensors"))


def test_quantized_root_module_round_trip(tmp_path: Path) -> None:
    q = quantize_dynamic(nn.Linear(16, 8))
    assert type(q).__name__ == "QuantizedLinear"
    save(q, tmp_path / "root.safetensors")
    loaded = load(tmp_path / "root.safetensors", model=nn.Linear(16, 8))
    x = torch.randn(3, 16)
    assert torch.equal(loaded(x), q(x))
    with pytest.raises(LoadError, match=r"shape \[4, 16\]"):
        load(tmp_path / "root.safetensors", model=nn.Linear(16, 4))


def test_manifest_contents(tmp_path: Path) -> None:
    q = _quantize("static", _cnn())
    save(q, tmp_path / "m", factory="lowbit.models:MnistCNN", extra={"note": "hi"})
    manifest = json.loads((tmp_path / "m" / "lowbit.json").read_text())
    assert manifest == read_manifest(tmp_path / "m")
    assert manifest["torch_version"] == torch.__version__ and manifest["lowbit_version"]
    assert manifest["architecture"]["class"] == "lowbit.models:MnistCNN"
    conv1 = manifest["modules"]["conv1"]["meta"]
    assert conv1["class"] == "QuantizedConv2d" and conv1["dtype"] == "float32"
    assert conv1["extra"]["calibrator"] == "minmax"
    # folded BatchNorm and fused ReLUs are structural replacements
    assert manifest["modules"]["bn1"] == {"kind": "replace", "class": "Identity"}
    assert "W8 per_channel" in manifest["schemes"]["fc1"]["scheme"]
    assert len(manifest["tensors_sha256"]) == 64 and manifest["extra"] == {"note": "hi"}
    assert b"pickle" not in (tmp_path / "m" / "model.safetensors").read_bytes()[:8]


def test_describe_lists_layers(tmp_path: Path) -> None:
    save(_quantize("mixed", _cnn()), tmp_path / "m")
    info = describe(tmp_path / "m")
    rows = {r["name"]: r for r in info["layers"]}
    assert set(rows) == {"conv1", "conv2", "fc1"}  # fc2 stayed in float
    assert rows["fc1"]["bits"] == 4 and rows["fc1"]["shape"] == [128, 1568]
    assert rows["conv2"]["scale_min"] <= rows["conv2"]["scale_max"]
    assert info["float_bytes"] == (128 * 10 + 10) * 4


def test_schemes_say_per_tensor_for_dynamic_convs(tmp_path: Path) -> None:
    """A dynamic conv quantizes its whole input with one scale: the report and the saved
    schemes said "per_token" (the config's Linear setting) for it."""
    q = _quantize("dynamic", _cnn())
    rows = {r.name: r.reason for r in q.lowbit_report.rows}
    assert "A8 per_tensor run-time" in rows["conv1"] and "A8 per_token run-time" in rows["fc1"]
    save(q, tmp_path / "m")
    layers = {r["name"]: r["scheme"] for r in describe(tmp_path / "m")["layers"]}
    assert "A8 per_tensor" in layers["conv2"] and "A8 per_token" in layers["fc2"]


def test_factory_needs_trust(tmp_path: Path) -> None:
    torch.manual_seed(0)
    q = quantize_dynamic(MLP(**SMALL_MLP))
    save(q, tmp_path / "m", factory="lowbit.models:MLP", factory_kwargs=SMALL_MLP)
    with pytest.raises(ValueError, match="trust_factory=True"):
        load(tmp_path / "m")
    loaded = load(tmp_path / "m", trust_factory=True)
    x = _images(3)
    assert torch.equal(loaded(x), q(x))
    with pytest.raises(ValueError, match=r"package\.module:function"):
        save(q, tmp_path / "n", factory="not a factory")


def test_no_factory_asks_for_model(tmp_path: Path) -> None:
    save(quantize_dynamic(MLP(**SMALL_MLP)), tmp_path / "m")
    with pytest.raises(ValueError, match="records no factory; pass the float model"):
        load(tmp_path / "m", trust_factory=True)


def test_file_size_ratios(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP().eval()  # 784-1024-1024-10, 1.9M parameters
    torch.save(model.state_dict(), tmp_path / "fp32.pt")
    fp32 = (tmp_path / "fp32.pt").stat().st_size
    int8 = save(quantize_dynamic(model), tmp_path / "int8.safetensors").stat().st_size
    int4 = save(quantize_weight_only(model, bits=4, group_size=128),
                tmp_path / "int4.safetensors").stat().st_size
    assert fp32 / int8 >= 3.8, fp32 / int8
    assert fp32 / int4 >= 6.5, fp32 / int4
    cnn = _cnn()
    torch.save(cnn.state_dict(), tmp_path / "cnn.pt")
    cnn_int8 = save(_quantize("static", cnn), tmp_path / "cnn8.safetensors").stat().st_size
    assert (tmp_path / "cnn.pt").stat().st_size / cnn_int8 >= 3.8


def test_plain_state_dict_round_trip(tmp_path: Path) -> None:
    """state_dict()/load_state_dict() work with torch.save / torch.load(weights_only=True)."""
    for method in ("dynamic", "static", "int4"):
        q = _quantize(method, _cnn())
        torch.save(q.state_dict(), tmp_path / f"{method}.pt")
        torch.manual_seed(123)
        other = _quantize(method, MnistCNN().eval())  # same structure, other weights
        state = torch.load(tmp_path / f"{method}.pt", weights_only=True)
        other.load_state_dict(state)
        x = _images(4)
        assert torch.equal(other(x), q(x)), method



@pytest.mark.parametrize("method", ["dynamic", "static", "int4"])
def test_whole_model_pickles_with_torch_save(tmp_path: Path, method: str) -> None:
    """torch.save(model) / torch.load(weights_only=False) (trusted files only) keep the
    outputs; the QuantizationConfig and report inside the model pickle too."""
    import pickle

    q = _quantize(method, _cnn())
    x = _images(4)
    with torch.inference_mode():
        expected = q(x)
    torch.save(q, tmp_path / "model.pt")
    back = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.inference_mode():
        assert torch.equal(back(x), expected)
    assert [type(m) for m in back.modules()] == [type(m) for m in q.modules()]
    report = pickle.loads(pickle.dumps(q.lowbit_report))
    assert report.to_dict() == q.lowbit_report.to_dict()

def test_tied_weights_are_stored_once(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    model[1].weight = model[0].weight
    path = save(model, tmp_path / "t.safetensors")
    assert len(safetensors.torch.load_file(path)) == 1
    skeleton = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    skeleton[1].weight = skeleton[0].weight
    loaded = load(path, model=skeleton)
    assert torch.equal(loaded[1].weight, model[0].weight)
    assert loaded[0].weight is loaded[1].weight


@pytest.mark.parametrize("method", ["dynamic", "static", "int4", "mixed"])
def test_meta_skeleton_loads_without_float_weights(tmp_path: Path, method: str) -> None:
    """A skeleton built on the meta device (no memory: how large models are loaded) gets the
    file's tensors, bit-identical; it failed ("Tensor.item() cannot be called on meta
    tensors") or, for INT4, kept its buffers on meta until the first call."""
    q = _quantize(method, _cnn())
    save(q, tmp_path / "m")
    with torch.device("meta"):
        skeleton = MnistCNN()
    loaded = load(tmp_path / "m", model=skeleton)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    x = _images(5, seed=7)
    with torch.inference_mode():
        assert torch.equal(loaded(x), q(x))


@pytest.mark.parametrize("method", ["dynamic", "static", "int4"])
def test_module_under_two_names_round_trips(tmp_path: Path, method: str,
                                            make_shared_layer_model) -> None:
    """The manifest lists ``alias`` (``{"kind": "shared", "of": "fc"}``) before ``fc``: load
    failed ("unknown module entry for 'alias'") because it rebuilt modules in file order."""
    torch.manual_seed(0)
    calib = [torch.randn(8, 8) for _ in range(2)]
    q = {"dynamic": lambda m: quantize_dynamic(m),
         "static": lambda m: quantize_static(m, calib, progress=False),
         "int4": lambda m: quantize_weight_only(m, bits=4, group_size=8)}[method](
             make_shared_layer_model("fc", "alias"))
    assert q.alias is q.fc
    save(q, tmp_path / "a")
    assert next(iter(read_manifest(tmp_path / "a")["modules"])) == "alias"
    loaded = load(tmp_path / "a", model=make_shared_layer_model("fc", "alias"))
    assert loaded.alias is loaded.fc and type(loaded.fc) is type(q.fc)
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), q(x))


def test_meta_skeleton_keeps_tied_weights_tied(tmp_path: Path) -> None:
    def build() -> nn.Module:
        m = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False),
                          nn.Linear(8, 4))
        m[1].weight = m[0].weight
        return m

    torch.manual_seed(0)
    cfg = QuantizationConfig.int8_dynamic(layer_overrides={"0": None, "1": None})
    q = PTQQuantizer(cfg, progress=False).quantize(build().eval())
    save(q, tmp_path / "t")
    with torch.device("meta"):
        skeleton = build()
    loaded = load(tmp_path / "t", model=skeleton)
    assert loaded[0].weight is loaded[1].weight and not loaded[0].weight.is_meta
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), q(x))


def test_meta_buffers_the_file_lacks_are_refused_before_any_change(tmp_path: Path) -> None:
    """A buffer the model computes in its constructor (rotary ``inv_freq``, non-persistent) is
    not in the file: on meta it would stay empty, so load refuses and names it."""

    class WithTable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.register_buffer("table", torch.arange(8.0), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x + self.table)

    save(quantize_dynamic(WithTable().eval()), tmp_path / "w")
    with torch.device("meta"):
        skeleton = WithTable()
    with pytest.raises(LoadError, match=r"meta device.*\['table'\].*buffers on the CPU"):
        load(tmp_path / "w", model=skeleton)
    assert type(skeleton.fc) is nn.Linear and skeleton.fc.weight.is_meta
    skeleton.table = torch.arange(8.0)  # the buffer on the CPU (what init_empty_weights does)
    loaded = load(tmp_path / "w", model=skeleton)
    assert type(loaded.fc).__name__ == "QuantizedLinear"
    assert loaded(torch.randn(2, 8)).shape == (2, 8)


def test_residual_model_round_trip(tmp_path: Path) -> None:
    from lowbit.models import TinyResNet

    torch.manual_seed(0)
    q = quantize_static(TinyResNet().eval(), [torch.randn(4, 3, 32, 32)], progress=False)
    save(q, tmp_path / "r")
    loaded = load(tmp_path / "r", model=TinyResNet())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), q(x))


def test_unconverted_lowbit_modules_are_refused(tmp_path: Path) -> None:
    from lowbit.calibrators import create_calibrator
    from lowbit.qat import QATPreparer

    model = nn.Sequential(nn.Linear(2, 2), create_calibrator("minmax"))
    with pytest.raises(ValueError, match=r"1 \(MinMaxCalibrator\) is not a saveable"):
        save(model, tmp_path / "m")
    qat = QATPreparer(QuantizationConfig.int8_dynamic()).prepare_for_qat(nn.Sequential(
        nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="convert_to_quantized first"):
        save(qat, tmp_path / "qat")


def test_wrong_paths(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.safetensors").mkdir()
    q = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="existing file"):
        save(q, tmp_path / "file")
    with pytest.raises(ValueError, match="is a directory"):
        save(q, tmp_path / "dir.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nothing", model=q)


# ------------------------------------------------------------------ integrity
@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, nn.Module]:
    q = _quantize("static", _cnn())
    return save(q, tmp_path / "m.safetensors"), q


def _header_len(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def _assert_skeleton_untouched(path: Path, match: str) -> None:
    skeleton = _cnn()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    types = [type(m) for m in skeleton.modules()]
    with pytest.raises(LoadError, match=match):
        load(path, model=skeleton)
    assert [type(m) for m in skeleton.modules()] == types
    after = skeleton.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tampered_tensor_data(saved: tuple[Path, nn.Module]) -> None:
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[_header_len(path) + 100] ^= 0x01
    path.write_bytes(bytes(data))
    _assert_skeleton_untouched(path, "SHA-256 mismatch")


def test_tampered_manifest(saved: tuple[Path, nn.Module]) -> None:
    path, _ = saved
    tensors = safetensors.torch.load_file(path)
    manifest = read_manifest(path)
    manifest["modules"]["fc1"]["meta"]["mode"] = "dynamic"  # well-formed, but not what was saved
    safetensors.torch.save_file(tensors, path, {"lowbit": json.dumps(manifest)})
    _assert_skeleton_untouched(path, "manifest checksum mismatch")


@pytest.mark.parametrize("keep", [0, 5, 60, -1000, -1])
def test_truncated_file(saved: tuple[Path, nn.Module], keep: int) -> None:
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    _assert_skeleton_untouched(path, "truncated|corrupted")


def test_unknown_format_version_is_named(saved: tuple[Path, nn.Module]) -> None:
    import hashlib

    path, _ = saved
    tensors = safetensors.torch.load_file(path)
    manifest = read_manifest(path)
    manifest["format_version"] = 99
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    manifest["manifest_sha256"] = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    safetensors.torch.save_file(tensors, path, {"lowbit": json.dumps(manifest)})
    _assert_skeleton_untouched(path, "unsupported lowbit format version 99")
    with pytest.raises(LoadError, match="version 99"):
        read_manifest(path)


def test_plain_safetensors_is_not_a_lowbit_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(LoadError, match="not a lowbit file"):
        load(path, model=nn.Linear(2, 1))


def test_wrong_skeleton_is_refused_before_any_change(saved: tuple[Path, nn.Module]) -> None:
    path, _ = saved
    skeleton = MnistCNN(hidden=64)
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(LoadError, match="does not match the saved model"):
        load(path, model=skeleton)
    assert type(skeleton.fc1) is nn.Linear and type(skeleton.bn1) is nn.BatchNorm2d
    assert all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())
    with pytest.raises(LoadError, match="float model has no module 'bn1'"):
        load(path, model=MLP(**SMALL_MLP))
    float_path = save(nn.Linear(4, 2), path.parent / "float.safetensors")
    with pytest.raises(LoadError, match=r"file has torch.float32, model torch.bfloat16"):
        load(float_path, model=nn.Linear(4, 2).to(torch.bfloat16))


def test_stale_sidecar_manifest_warns(tmp_path: Path) -> None:
    q = _quantize("dynamic", _cnn())
    save(q, tmp_path / "m")
    (tmp_path / "m" / "lowbit.json").write_text("{}")
    with pytest.warns(UserWarning, match="differs from the manifest embedded"):
        loaded = load(tmp_path / "m", model=MnistCNN())
    assert torch.equal(loaded(_images(2)), q(_images(2)))


# ------------------------------------------------------------------ atomic save
_SAVER = textwrap.dedent("""
    import sys, time, torch, safetensors.torch
    from lowbit.models import MLP
    from lowbit.ptq import quantize_dynamic
    from lowbit.serialization import save

    real_save = safetensors.torch.save
    def slow_save_file(tensors, filename, metadata=None):  # writes half, then hangs
        data = real_save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            print("HALF", flush=True)
            time.sleep(120)
            f.write(data[len(data) // 2:])
    safetensors.torch.save_file = slow_save_file
    torch.manual_seed(1)
    save(quantize_dynamic(MLP(in_features=784, hidden=(256,), num_classes=10)), sys.argv[1])
""")


def test_killed_save_leaves_previous_file_intact(tmp_path: Path) -> None:
    kwargs = {"in_features": 784, "hidden": [256], "num_classes": 10}
    torch.manual_seed(0)
    first = quantize_dynamic(MLP(**kwargs))
    for target in (tmp_path / "m", tmp_path / "single.safetensors"):
        save(first, target)
        before = sorted(p.name for p in target.parent.iterdir())
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(target)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "HALF"  # killed in the middle of a write
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        # (a save writes inside a private folder: what its writer leaves goes with it)
        leftovers = list(target.parent.rglob(".*.lowbit-*.tmpdir"))
        assert leftovers and all(any(p.iterdir()) for p in leftovers), \
            "the kill should have happened during the temporary write"
        loaded = load(target, model=MLP(**kwargs))  # the previous save, verified
        x = _images(3)
        assert torch.equal(loaded(x), first(x))
        for p in leftovers:  # an hour later, the next save removes what the crash left
            os.utime(p, (p.stat().st_atime, p.stat().st_mtime - STALE_TMP_SECONDS - 1))
        save(first, target)
        assert sorted(p.name for p in target.parent.iterdir()) == before


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a, b = (quantize_dynamic(MLP(**SMALL_MLP)) for _ in range(2))
    save(a, tmp_path / "m")
    save(b, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["lowbit.json",
                                                                  "model.safetensors"]
    x = _images(2)
    assert torch.equal(load(tmp_path / "m", model=MLP(**SMALL_MLP))(x), b(x))


def test_stale_temporaries_are_removed_by_the_next_save(tmp_path: Path) -> None:
    import fcntl

    folder = tmp_path / "m"
    folder.mkdir()
    old = folder.stat().st_mtime - STALE_TMP_SECONDS - 60
    names = {"stale": ".model.safetensors.lowbit-a1b2c3d4.tmp",
             "stale_json": ".lowbit.json.lowbit-zz99xx00.tmp",
             "fresh": ".model.safetensors.lowbit-e5f6g7h8.tmp",  # a save running right now
             "locked": ".model.safetensors.lowbit-i9j0k1l2.tmp",  # old, but a save holds it
             "not_ours": ".model.safetensors.tmp", "user": "notes.lowbit-aaaa.tmp"}
    for key, name in names.items():
        (folder / name).write_bytes(b"partial")
        if key != "fresh":
            os.utime(folder / name, (old, old))
    (folder / ".x.lowbit-link0000.tmp").symlink_to(folder / names["user"])
    os.utime(folder / ".x.lowbit-link0000.tmp", (old, old), follow_symlinks=False)
    # a save killed mid-write: its private folder, holding safetensors' own temporary
    crashed = folder / ".model.safetensors.lowbit-dead0000.tmpdir"
    crashed.mkdir()
    (crashed / ".tmpAbC123").write_bytes(b"most of a model")
    os.utime(crashed, (old, old))
    with open(folder / names["locked"], "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        save(quantize_dynamic(nn.Sequential(nn.Linear(8, 4))), folder)
    left = {p.name for p in folder.iterdir()}
    assert left == {"model.safetensors", "lowbit.json", ".x.lowbit-link0000.tmp",
                    *(names[k] for k in ("fresh", "locked", "not_ours", "user"))}
    # once the lock is released, any age counts with older_than=0
    removed = clean_stale_temporaries(folder, older_than=0)
    assert sorted(p.name for p in removed) == sorted([names["fresh"], names["locked"]])


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_saved_files_honour_the_umask(tmp_path: Path, umask: int) -> None:
    """mkstemp creates 0600 files; saves get what open() would give (0o666 & ~umask)."""
    q = quantize_dynamic(nn.Sequential(nn.Linear(8, 4)))
    previous = os.umask(umask)
    try:
        save(q, tmp_path / "m")
        save(q, tmp_path / "single.safetensors")
    finally:
        os.umask(previous)
    for p in (tmp_path / "m" / "model.safetensors", tmp_path / "m" / "lowbit.json",
              tmp_path / "single.safetensors"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


def test_int4_int8_activations_setting_is_saved_with_the_module(tmp_path) -> None:
    """Int4Linear.int8_activations changes the numbers (int8 vs float activations on the
    INT4 kernel): a module's own setting travels with the file."""
    kwargs = {"in_features": 64, "hidden": [128], "num_classes": 4}
    torch.manual_seed(0)
    q = quantize_weight_only(MLP(**kwargs).eval(), bits=4, group_size=32)
    q.layers[0].int8_activations = False
    save(q, tmp_path / "m")
    r = load(tmp_path / "m", model=MLP(**kwargs))
    assert r.layers[0].int8_activations is False and r.layers[2].int8_activations is True
    assert "int8_activations" not in r.layers[2].meta()
    x = torch.randn(5, 64)
    with torch.inference_mode():
        assert torch.equal(r(x), q(x))


def test_a_loaded_model_saved_again_keeps_its_report(tmp_path: Path) -> None:
    """lowbit.save of a loaded model wrote no schemes and no quantization report (a loaded
    model carries them in lowbit_manifest, not lowbit_report): lost after one round trip."""
    q = quantize_static(_cnn(), [torch.randn(8, 1, 28, 28)], progress=False)
    first = save(q, tmp_path / "a")
    again = save(load(first, model=_cnn()), tmp_path / "b")
    one, two = read_manifest(first), read_manifest(again)
    assert two["schemes"] == one["schemes"] and len(one["schemes"]) >= 3
    assert two["quantization_report"] == one["quantization_report"]


def test_load_refuses_an_identity_where_the_float_model_has_another_module(
        tmp_path: Path) -> None:
    """A fused ReLU is saved as an Identity entry; loading that file into a model with a Tanh
    there swapped the Tanh for an Identity, silently. Refused, naming both; a model of another
    class with the same layer names loads with a warning."""
    def mlp(act: nn.Module) -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 8), act, nn.Linear(8, 4)).eval()

    path = save(quantize_dynamic(mlp(nn.ReLU())), tmp_path / "m")
    with pytest.raises(LoadError, match=r"Identity at '1'.*has a Tanh there"):
        load(path, model=mlp(nn.Tanh()))

    class Other(nn.Sequential):
        pass

    with pytest.warns(UserWarning, match="saved from a Sequential, and is loaded into a"):
        load(path, model=Other(*mlp(nn.ReLU())))
    root = save(quantize_dynamic(nn.Linear(16, 8)), tmp_path / "root.safetensors")
    with warnings.catch_warnings():  # a quantized root is saved as its quantized class
        warnings.simplefilter("error")
        load(root, model=nn.Linear(16, 8))


def test_save_refuses_the_runtime_module_of_a_compiled_backend(tmp_path: Path) -> None:
    """set_backend(q, "onnxruntime", x) returns an OnnxRuntimeModule; lowbit.save wrote a file
    with no weights from it, and only load said so. Refused at save, saying what to save."""
    from lowbit import backends

    q = quantize_dynamic(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).eval())
    runtime = backends.set_backend(q, "onnxruntime", torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"OnnxRuntimeModule.*save the quantized PyTorch model"):
        save(runtime, tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_a_layer_backend_survives_save_and_load(tmp_path: Path, backend: str) -> None:
    """A model quantized with backend="torch" (as the docs show) saved fine, then load refused
    its file as damaged ('backend' must be 'auto' or 'reference')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    q = quantize_dynamic(model, backend=backend)
    save(q, tmp_path / "q")
    r = load(tmp_path / "q", model=nn.Sequential(nn.Linear(16, 8)))
    x = torch.randn(3, 16)
    assert r[0].backend == backend and torch.equal(r(x), q(x))
