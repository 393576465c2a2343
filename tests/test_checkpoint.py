"""Checkpoints: QAT state in state_dict, exact resume, safetensors + JSON only, refusals."""

from __future__ import annotations

import json
import struct

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
    assert meta["format"] == "lowbit.checkpoint/1"
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
    with pytest.raises(RuntimeError, match="Missing key"):
        load_checkpoint(path, MnistCNN(channels=(4, 8), hidden=16))
