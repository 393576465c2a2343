"""Checkpoints: QAT state in state_dict, exact resume, safetensors + JSON only, refusals."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lowbit.checkpoint import load_checkpoint, save_checkpoint
from lowbit.config import QuantizationConfig
from lowbit.models import MnistCNN
from lowbit.qat import QATConfig, get_qat_statistics, prepare_qat

CFG = QATConfig(quantization=QuantizationConfig.int8_static(), learnable_scale=True)


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(n)]


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch) -> torch.Tensor:
    model.train()
    opt.zero_grad()
    loss = F.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.fixture()
def trained(tmp_path):
    torch.manual_seed(0)
    float_model = MnistCNN(channels=(4, 8), hidden=16)
    qat = prepare_qat(float_model, CFG)
    opt = torch.optim.Adam(qat.parameters(), lr=1e-3)
    for batch in _batches(3):
        _step(qat, opt, batch)
    path = save_checkpoint(tmp_path / "qat.safetensors", qat, opt, extra={"step": 3})
    return float_model, qat, opt, path


def test_state_dict_holds_qparams_and_observer_state(trained) -> None:
    _, qat, _, _ = trained
    keys = set(qat.state_dict())
    for key in ("conv1.input_quantizer.log_scale", "conv1.input_quantizer.zero_point",
                "conv1.input_quantizer.observer.min_val", "fc1.weight_quantizer.observer.max_val",
                "conv1.bn.running_mean", "conv1.num_steps", "fc2.input_quantizer.num_steps"):
        assert key in keys, key


def test_state_dict_into_a_fresh_model_is_bit_exact(trained) -> None:
    float_model, qat, _, _ = trained
    fresh = prepare_qat(float_model, CFG)
    fresh.load_state_dict(qat.state_dict())
    x = _batches(1, seed=7)[0][0]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), qat.eval()(x))


def test_checkpoint_resumes_training_exactly(trained) -> None:
    float_model, qat, opt, path = trained
    x_eval = _batches(1, seed=7)[0][0]
    with torch.no_grad():
        eval_out = qat.eval()(x_eval)
    fresh = prepare_qat(float_model, CFG)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    assert load_checkpoint(path, fresh, fresh_opt) == {"step": 3}
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x_eval), eval_out)  # same outputs, bit for bit
    nxt = _batches(2, seed=9)
    for batch in nxt:  # training resumes with the same next-step losses
        assert torch.equal(_step(qat, opt, batch), _step(fresh, fresh_opt, batch))
    for (k, a), b in zip(qat.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    a, b = get_qat_statistics(qat), get_qat_statistics(fresh)  # statistics continue too
    assert a.traces["conv2.input"]["scale"] == b.traces["conv2.input"]["scale"]
    assert len(b.traces["conv2.input"]["step"]) == 5


def test_file_is_safetensors_with_json_metadata(trained, tmp_path) -> None:
    _, _, _, path = trained
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["lowbit.checkpoint"])
    assert meta["format"] == "lowbit.checkpoint/2" and len(meta["checksum"]) == 64
    assert meta["optimizer"]["class"] == "Adam"
    assert meta["qat_config"]["learnable_scale"] is True
    assert "model/conv1.input_quantizer.log_scale" in header
    assert any(k.startswith("optimizer/state/") and k.endswith("/exp_avg") for k in header)
    assert [p.name for p in tmp_path.iterdir()] == ["qat.safetensors"]  # no temp file left


def test_plain_model_and_sgd_momentum(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch = (torch.randn(6, 4), torch.randint(0, 2, (6,)))
    for _ in range(2):
        _step(model, opt, batch)
    path = save_checkpoint(tmp_path / "m.safetensors", model, opt)
    other = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    other_opt = torch.optim.SGD(other.parameters(), lr=0.5, momentum=0.9)
    assert load_checkpoint(path, other, other_opt) == {}
    assert other_opt.param_groups[0]["lr"] == 0.1
    assert torch.equal(_step(model, opt, batch), _step(other, other_opt, batch))


def test_refusals(trained, tmp_path) -> None:
    float_model, qat, _, path = trained
    fresh = prepare_qat(float_model, CFG)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors", fresh)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_checkpoint(junk, fresh)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not written by lowbit"):
        load_checkpoint(foreign, fresh)
    with pytest.raises(ValueError, match="holds Adam state"):
        load_checkpoint(path, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="parameter groups of sizes"):
        load_checkpoint(path, fresh, torch.optim.Adam(list(fresh.parameters())[:3]))
    other_cfg = prepare_qat(float_model, QATConfig(learnable_scale=False))
    with pytest.raises(ValueError, match="another QATConfig"):
        load_checkpoint(path, other_cfg)
    no_opt = save_checkpoint(tmp_path / "no_opt.safetensors", qat)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_checkpoint(no_opt, fresh, torch.optim.Adam(fresh.parameters()))
    with pytest.raises(ValueError, match=r"does not fit the model \(missing from the checkpoint: "
                                         r"\['bn1.bias'"):
        load_checkpoint(path, MnistCNN(channels=(4, 8), hidden=16))



def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return set(after) == set(before) and all(
        after[k].shape == before[k].shape and torch.equal(after[k], before[k]) for k in before)


def _mlp(hidden: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))


@pytest.fixture()
def adam_ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        _step(model, opt, (torch.randn(6, 4), torch.randint(0, 2, (6,))))
    return save_checkpoint(tmp_path / "adam.safetensors", model, opt, extra={"epoch": 3})


def test_refusals_change_neither_model_nor_optimizer(trained, adam_ckpt) -> None:
    """Checks run before any write: the old code loaded the weights, then refused the
    optimizer."""
    float_model, _, _, path = trained
    fresh = prepare_qat(float_model, CFG)
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match="holds Adam state but the optimizer is a SGD"):
        load_checkpoint(path, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
    assert _unchanged(fresh, before)

    torch.manual_seed(1)
    model = _mlp()
    before = _snapshot(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    opt_before = opt.state_dict()
    cases = [  # (model, optimizer, message)
        (model, torch.optim.SGD(model.parameters(), lr=0.1), "holds Adam state"),
        (model, torch.optim.Adam(list(model.parameters())[::-1]),  # same count, other shapes
         r"optimizer state 'exp_avg' of parameter 0 has shape \(8, 4\), the parameter \(2,\)"),
        (model, torch.optim.Adam(list(model.parameters())[:2]), "parameter groups of sizes"),
    ]
    for m, o, match in cases:
        with pytest.raises(ValueError, match=match):
            load_checkpoint(adam_ckpt, m, o)
        assert _unchanged(model, before)
    wider = _mlp(hidden=16)  # load_state_dict copied the fitting tensors, then raised
    wider_before = _snapshot(wider)
    with pytest.raises(ValueError, match=r"0.weight: checkpoint \(8, 4\), model \(16, 4\)"):
        load_checkpoint(adam_ckpt, wider, torch.optim.Adam(wider.parameters()), strict=False)
    assert _unchanged(wider, wider_before)
    assert opt.state_dict() == opt_before and opt.param_groups[0]["lr"] == 0.5
    assert load_checkpoint(adam_ckpt, model, opt) == {"epoch": 3}  # the right ones still load
    assert opt.param_groups[0]["lr"] == 0.01 and not _unchanged(model, before)


def _header_end(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_flipped_byte_is_detected(adam_ckpt) -> None:
    raw = adam_ckpt.read_bytes()
    end = _header_end(adam_ckpt)
    epoch = raw.index(b'epoch\\": 3') + len(b'epoch\\": ')  # a digit inside the JSON metadata
    for offset in (end, end + 37, len(raw) - 1, epoch):
        flipped = bytearray(raw)
        flipped[offset] ^= 0x01 if offset != epoch else 0x07  # "3" -> "4": still valid JSON
        adam_ckpt.write_bytes(bytes(flipped))
        model = _mlp()
        before = _snapshot(model)
        with pytest.raises(ValueError, match="fails its SHA-256 checksum: the file was "
                                             "corrupted or modified"):
            load_checkpoint(adam_ckpt, model, torch.optim.Adam(model.parameters()))
        assert _unchanged(model, before)


def test_checkpoint_without_checksum_loads_with_a_warning(adam_ckpt) -> None:
    from safetensors.torch import load_file

    raw = adam_ckpt.read_bytes()
    meta = json.loads(json.loads(raw[8:_header_end(adam_ckpt)])["__metadata__"]
                      ["lowbit.checkpoint"])
    meta["format"] = "lowbit.checkpoint/1"  # as written before checksums
    del meta["checksum"]
    save_file(load_file(adam_ckpt), adam_ckpt, {"lowbit.checkpoint": json.dumps(meta)})
    with pytest.warns(UserWarning, match="written before checkpoints had checksums"):
        assert load_checkpoint(adam_ckpt, _mlp()) == {"epoch": 3}


def test_huge_garbage_checkpoint_is_refused_from_its_header(tmp_path) -> None:
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(b"\xff" * 8)
        f.truncate(1 << 40)  # sparse: 1 TiB that is never read
    with pytest.raises(ValueError, match=r"load_checkpoint: .* not a safetensors file \(its "
                                         r"first 8 bytes declare a header of"):
        load_checkpoint(path, _mlp())


def test_malformed_qat_statistics_are_refused_before_writing(tmp_path) -> None:
    from safetensors.torch import load_file

    from lowbit.checkpoint import _checksum

    torch.manual_seed(0)
    qat = prepare_qat(MnistCNN(channels=(4, 8), hidden=16), CFG)
    opt = torch.optim.Adam(qat.parameters(), lr=1e-3)
    _step(qat, opt, _batches(1)[0])
    path = save_checkpoint(tmp_path / "q.safetensors", qat, opt)
    tensors = load_file(path)
    raw = path.read_bytes()
    meta = json.loads(json.loads(raw[8:_header_end(path)])["__metadata__"]["lowbit.checkpoint"])
    node = next(iter(meta["qat_statistics"]["traces"]))
    meta["qat_statistics"]["traces"][node]["step"] = [0, 1, 2, 3]  # longer than its columns
    meta["checksum"] = _checksum(meta, tensors)  # consistent: what an attacker can do
    save_file(tensors, path, {"lowbit.checkpoint": json.dumps(meta)})
    fresh = prepare_qat(MnistCNN(channels=(4, 8), hidden=16), CFG)
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=f"the QAT statistics of '{node}' are malformed"):
        load_checkpoint(path, fresh)
    assert _unchanged(fresh, before)


def test_checkpoint_files_honour_umask_and_clean_stale_temporaries(tmp_path) -> None:
    stale = tmp_path / ".ckpt.safetensors.lowbit-0a1b2c3d.tmp"
    stale.write_bytes(b"left by a crash")
    os.utime(stale, (0, 0))
    previous = os.umask(0o027)
    try:
        path = save_checkpoint(tmp_path / "ckpt.safetensors", _mlp())
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


def test_a_wrapped_qat_model_trained_with_another_config_is_refused(tmp_path: Path) -> None:
    """The QATConfig check read only the root module: a QAT model inside a wrapper, trained with
    INT8 weights, loaded silently into the same wrapper prepared for INT4 (its quantizers took
    the INT8 scales and clipped each row to a handful of codes)."""
    def wrapped(bits: int) -> nn.Module:
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).train()
        q = QuantizationConfig.int8_static()
        q = QuantizationConfig.from_dict({**q.to_dict(),
                                          "weights": {**q.to_dict()["weights"], "bits": bits}})
        holder = nn.Module()
        holder.net = prepare_qat(base, QATConfig(quantization=q))
        return holder

    eight = wrapped(8)
    eight.net(torch.randn(8, 16))
    save_checkpoint(tmp_path / "c.safetensors", eight)
    with pytest.raises(ValueError, match=r"its QAT model 'net'\) was prepared with"):
        load_checkpoint(tmp_path / "c.safetensors", wrapped(4))
    load_checkpoint(tmp_path / "c.safetensors", wrapped(8))  # the same config loads
