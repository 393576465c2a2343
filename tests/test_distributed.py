"""lowbit.distributed with 2 real gloo processes on the CPU (spawned here, bounded in time).

Each scenario runs this file as a script in two processes (``python tests/test_distributed.py
SCENARIO RANK WORLD PORT OUT``, rendezvous over ``MASTER_ADDR=127.0.0.1`` and a free port); the
ranks write what they computed to ``OUT`` (safetensors / JSON) and the test compares it with a
single-process run here.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.data import mnist_splits
from lowbit.distributed import (
    DistributedSyncError,
    active_group,
    configure_qat_sync,
    on_rank0,
    sync_calibrators,
    unwrap,
)
from lowbit.models import MnistCNN

WORLD = 2
CALIBRATORS = ("minmax", "percentile", "entropy", "mse", "moving_average")
LAYERS = ("conv1", "conv2", "fc1", "fc2")
QAT_STEPS = 4


# ---------------------------------------------------------------------- shared by both sides
def _model() -> MnistCNN:
    torch.manual_seed(0)
    model = MnistCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics to fold
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _batches() -> list[torch.Tensor]:
    """8 batches of 16 real MNIST images; rank r calibrates on batches r, r + 2, ..."""
    images = mnist_splits().train.tensors[0][:128]
    return list(images.split(16))


def _static_config(calibrator: str) -> lowbit.QuantizationConfig:
    return lowbit.QuantizationConfig.int8_static(calibrator=calibrator)


def _input_qparams(qmodel: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name in LAYERS:
        layer = qmodel.get_submodule(name)
        out[f"{name}.scale"] = layer.input_scale.detach().clone().reshape(-1)
        out[f"{name}.zp"] = layer.input_zero_point.detach().clone().reshape(-1).to(torch.int64)
    return out


def _qat_config(sync_every: int) -> lowbit.QATConfig:
    return lowbit.QATConfig(quantization=lowbit.QuantizationConfig.int8_static(),
                            sync_every=sync_every)


def _qat_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """QAT_STEPS batches of 32 real MNIST images, different ones on every rank."""
    data = mnist_splits().train
    images, labels = data.tensors[0][512:1024], data.tensors[1][512:1024]
    return list(zip(images.split(32)[rank::WORLD], labels.split(32)[rank::WORLD],
                    strict=True))[:QAT_STEPS]


def _weight_calibrated(batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """SmoothQuant factors and GPTQ / SignRound weights of the Linear layers, from ``batches``."""
    model, out = _model(), {}
    q = lowbit.quantize_dynamic(model, smooth_quant=0.5, calibration_data=batches,
                                progress=False)
    for name in ("fc1", "fc2"):
        out[f"wc/sq/{name}"] = q.get_submodule(name).input_smoothing.clone()
    for method, kwargs in (("gptq", {}), ("signround", {"iters": 20})):
        cfg = lowbit.QuantizationConfig.int4_weight_only(32, method=method,
                                                         method_kwargs=kwargs)
        q = lowbit.PTQQuantizer(cfg, progress=False).quantize(model, batches)
        for name in ("fc1", "fc2"):
            out[f"wc/{method}/{name}"] = q.get_submodule(name).dequantize_weight().clone()
    return out


# ---------------------------------------------------------------------- the worker side
def _ptq_worker(rank: int, out: Path) -> None:
    shard = _batches()[rank::WORLD]
    model = _model()
    result: dict[str, torch.Tensor] = {}
    for calibrator in CALIBRATORS:
        q = lowbit.quantize_static(model, shard, _static_config(calibrator), progress=False)
        assert q.lowbit_report.num_calibration_batches == len(_batches())
        result.update({f"{calibrator}/{k}": v for k, v in _input_qparams(q).items()})
    local = lowbit.quantize_static(model, shard, _static_config("minmax"), progress=False,
                                   sync=False)
    result.update({f"local/{k}": v for k, v in _input_qparams(local).items()})
    # sensitivity analysis calibrates through PTQQuantizer: same qparams on every rank
    report = lowbit.analyze_sensitivity(model, _static_config("minmax"),
                                        calibration_data=shard, example_input=_batches()[0],
                                        progress=False)
    result["sensitivity/cosine"] = torch.tensor([r.cosine for r in sorted(
        report.rows, key=lambda r: r.name)], dtype=torch.float64)
    result.update(_weight_calibrated(shard))
    save_file(result, str(out / f"ptq_rank{rank}.safetensors"))
    # rank 0 writes the quantized model once; every rank reads it back after the barrier
    q = lowbit.quantize_static(model, shard, _static_config("minmax"), progress=False)
    on_rank0(lowbit.save, q, out / "ptq_model")
    loaded = lowbit.load(out / "ptq_model", model=MnistCNN())
    x = _batches()[0]
    assert torch.equal(loaded(x), q(x)), "the model rank 0 saved differs from this rank's"


def _qat_worker(rank: int, out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    result: dict[str, torch.Tensor] = {}
    for sync_every in (1, 3, 0):
        preparer = lowbit.QATPreparer(_qat_config(sync_every))
        qat = preparer.prepare_for_qat(_model()).train()
        ddp = DDP(qat)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        for step, (x, y) in enumerate(_qat_batches(rank), 1):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            for name in LAYERS:
                fq = unwrap(ddp).get_submodule(name).input_quantizer
                result[f"sync{sync_every}/step{step}/{name}"] = torch.cat(
                    [fq.scale.reshape(1), fq.zero_point.reshape(1).float()])
        result[f"sync{sync_every}/bn_mean"] = unwrap(ddp).conv1.bn.running_mean.clone()
        qmodel = preparer.convert_to_quantized(unwrap(ddp))
        result.update({f"sync{sync_every}/converted/{k}": v
                       for k, v in _input_qparams(qmodel).items()})
        x = _batches()[0]
        result[f"sync{sync_every}/output"] = qmodel(x)
        if sync_every == 1:
            on_rank0(lowbit.save, qmodel, out / "qat_model")
            on_rank0(lowbit.save_checkpoint, out / "qat.safetensors", unwrap(ddp), opt)
            loaded = lowbit.load(out / "qat_model", model=MnistCNN())
            assert torch.equal(loaded(x), qmodel(x))
    save_file(result, str(out / f"qat_rank{rank}.safetensors"))


def _fsdp_worker(rank: int, out: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    preparer = lowbit.QATPreparer(_qat_config(1))
    qat = preparer.prepare_for_qat(_model()).train()
    for name in LAYERS:
        fully_shard(qat.get_submodule(name))
    fully_shard(qat)
    opt = torch.optim.SGD(qat.parameters(), lr=0.05)
    for x, y in _qat_batches(rank):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(qat(x), y).backward()
        opt.step()
    full = get_model_state_dict(qat, options=StateDictOptions(full_state_dict=True))
    plain = preparer.prepare_for_qat(_model())  # an unsharded copy takes the full state
    plain.load_state_dict(full)
    qmodel = preparer.convert_to_quantized(plain)
    result = {k: v for k, v in _input_qparams(qmodel).items()}
    result["output"] = qmodel(_batches()[0])
    save_file(result, str(out / f"fsdp_rank{rank}.safetensors"))


class _Counting(lowbit.calibrators.MinMaxCalibrator):
    """A custom calibrator with a public counter that differs between the ranks."""

    def __init__(self, spec=None, *, tensor_name: str = "") -> None:
        super().__init__(spec, tensor_name=tensor_name)
        self.seen = 0

    def _observe(self, *args, **kwargs) -> None:
        self.seen += 1
        super()._observe(*args, **kwargs)


def _mismatch_worker(rank: int, out: Path) -> None:
    """Ranks that differ (a config that leaves rank 1 no static layer, another percentile, an
    empty GPTQ / SmoothQuant shard, a NaN batch in QAT with a histogram observer) must all
    raise at once; each case had left the healthy rank waiting for the group's timeout."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    shard = _batches()[rank::WORLD][:2]
    percentile = lowbit.QuantizationConfig.int8_static(
        calibrator="percentile", calibrator_kwargs={"percentile": 99.0 if rank else 99.9})
    gptq = lowbit.QuantizationConfig.int4_weight_only(32, method="gptq")
    cases = {
        "no_static": lambda: lowbit.quantize_static(_model(), shard, lowbit.QuantizationConfig
                                                    .int8_static(skip_layers=("*",) if rank
                                                                 else ()), progress=False),
        "options": lambda: lowbit.quantize_static(_model(), shard, percentile, progress=False),
        "gptq_empty": lambda: lowbit.PTQQuantizer(gptq, progress=False).quantize(
            _model(), [] if rank else shard),
        "smooth_empty": lambda: lowbit.quantize_dynamic(
            _model(), smooth_quant=0.5, calibration_data=[] if rank else shard, progress=False),
    }

    def qat_nan() -> None:
        cfg = lowbit.QATConfig(quantization=lowbit.QuantizationConfig.int8_static(
            calibrator="percentile"))
        ddp = DDP(lowbit.QATPreparer(cfg).prepare_for_qat(_model()).train())
        for step, (x, y) in enumerate(_qat_batches(rank)[:2]):
            if rank and step:
                x = x.clone().fill_(float("nan"))
            torch.nn.functional.cross_entropy(ddp(x), y).backward()

    cases["qat_nan"] = qat_nan

    def counting() -> None:  # a custom calibrator's data-dependent attribute is no setting
        cal = _Counting(tensor_name="fc.input")
        for x in shard[:rank + 1]:
            cal(x)
        sync_calibrators({"fc": cal})
        assert cal.num_batches == 3

    cases["counting"] = counting
    for how, case in cases.items():
        start = time.perf_counter()
        try:
            case()
            result = {"type": None}
        except Exception as exc:  # reported to the test through a file
            result = {"type": type(exc).__name__, "message": str(exc)}
        result["seconds"] = time.perf_counter() - start
        (out / f"{how}_rank{rank}.json").write_text(json.dumps(result))


def _fail_worker(rank: int, out: Path) -> None:
    """Rank 1 raises mid-calibration (a NaN batch), then hangs in it (on a subgroup with a
    4-second timeout, passed as process_group=), then dies in it (os._exit)."""
    _mismatch_worker(rank, out)
    hang_group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=4))
    for how in ("raise", "hang", "exit"):
        shard = _batches()[rank::WORLD]
        group = hang_group if how == "hang" else None
        if rank == 1 and how == "exit":
            def dying(first: torch.Tensor):  # the process ends mid-calibration, no goodbye
                yield first
                os._exit(3)
            shard = dying(shard[0])
        elif rank == 1 and how == "hang":
            def stuck(first: torch.Tensor):  # alive, but late past the group's timeout
                yield first
                time.sleep(8)
            shard = stuck(shard[0])
        elif rank == 1:
            shard = [shard[0], shard[1].clone().fill_(float("nan"))]
        try:
            lowbit.quantize_static(_model(), shard, progress=False, process_group=group)
        except Exception as exc:  # reported to the test through a file
            (out / f"{how}_rank{rank}.json").write_text(json.dumps(
                {"type": type(exc).__name__, "message": str(exc)}))


def _worker(scenario: str, rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    try:
        if scenario == "main":
            for part in (_ptq_worker, _qat_worker, _fsdp_worker):
                start = time.perf_counter()
                part(rank, out)
                print(f"{part.__name__}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        else:
            _fail_worker(rank, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------- the test side
def _clean_env() -> dict[str, str]:
    """This environment without torchrun's variables (another test may have set them)."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, out: Path, timeout: float = 90.0) -> list[subprocess.CompletedProcess]:
    """Run ``scenario`` on 2 ranks; kill both after ``timeout`` seconds (then fail)."""
    port = _free_port()
    env = _clean_env()
    procs = [subprocess.Popen([sys.executable, __file__, scenario, str(r), str(WORLD), str(port),
                               str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in range(WORLD)]
    done = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario}: the ranks did not finish within {timeout:.0f} s (a hang)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def _check_ok(done: list[subprocess.CompletedProcess]) -> None:
    for r, d in enumerate(done):
        assert d.returncode == 0, f"rank {r} failed:\n{d.stderr[-4000:]}"


@pytest.fixture(autouse=True)
def _one_thread():
    """The single-process references run on one thread, as the ranks do (and as the suite's
    xdist workers do): a GEMM's float sums on another thread count round differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PTQ, DDP QAT and FSDP2 QAT on 2 ranks (one launch: starting a rank costs seconds)."""
    out = tmp_path_factory.mktemp("dist")
    _check_ok(_launch("main", out, timeout=150))
    return out


@pytest.mark.parametrize("calibrator", CALIBRATORS)
def test_sharded_calibration_equals_union(run: Path, calibrator: str) -> None:
    ranks = [load_file(str(run / f"ptq_rank{r}.safetensors")) for r in range(WORLD)]
    for key in ranks[0]:  # every rank ends with the very same qparams
        if not key.startswith("local/"):
            assert torch.equal(ranks[0][key], ranks[1][key]), key
    model, batches = _model(), _batches()
    if calibrator == "moving_average":  # defined as the batch-weighted mean of the ranks' EMAs
        expected, shards = {}, []
        for r in range(WORLD):
            q = lowbit.PTQQuantizer(_static_config(calibrator), progress=False)
            q.quantize(model, batches[r::WORLD])
            shards.append(q.calibrators)
        for name in LAYERS:
            merged = lowbit.create_calibrator(shards[0][name])
            for calibrators in shards:
                merged.merge(calibrators[name])
            scale, zp = merged.compute_qparams()
            expected[f"{name}.scale"] = scale.reshape(-1)
            expected[f"{name}.zp"] = zp.reshape(-1).to(torch.int64)
    else:  # single process on the union of the shards
        expected = _input_qparams(lowbit.quantize_static(model, batches,
                                                         _static_config(calibrator),
                                                         progress=False))
    for key, value in expected.items():
        assert torch.equal(ranks[0][f"{calibrator}/{key}"], value), (calibrator, key)


def test_weight_calibration_is_the_same_on_every_rank(run: Path) -> None:
    """SmoothQuant factors (maxima over the ranks: those of the union of the shards), GPTQ
    weights (summed statistics: the union's up to the order of the sums) and SignRound
    weights (rank 0's) are the same on every rank."""
    ranks = [load_file(str(run / f"ptq_rank{r}.safetensors")) for r in range(WORLD)]
    keys = [k for k in ranks[0] if k.startswith("wc/")]
    assert len(keys) == 6
    for key in keys:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    union = _weight_calibrated(_batches())
    for name in ("fc1", "fc2"):
        assert torch.equal(ranks[0][f"wc/sq/{name}"], union[f"wc/sq/{name}"]), name
        got, want = ranks[0][f"wc/gptq/{name}"], union[f"wc/gptq/{name}"]
        assert (got != want).float().mean() < 0.01, name  # a few codes at rounding edges
    local = _weight_calibrated(_batches()[::WORLD])  # rank 0's shard alone
    assert not torch.equal(local["wc/sq/fc1"], union["wc/sq/fc1"])
    other = _weight_calibrated(_batches()[1::WORLD])
    for name in ("fc1", "fc2"):  # SignRound: rank 0's, which rank 1's own shard does not give
        assert torch.equal(ranks[0][f"wc/signround/{name}"], local[f"wc/signround/{name}"])
        assert not torch.equal(ranks[1][f"wc/signround/{name}"], other[f"wc/signround/{name}"])


def test_sync_false_keeps_each_shard_local(run: Path) -> None:
    ranks = [load_file(str(run / f"ptq_rank{r}.safetensors")) for r in range(WORLD)]
    model, batches = _model(), _batches()
    for r in range(WORLD):
        own = _input_qparams(lowbit.quantize_static(model, batches[r::WORLD],
                                                    _static_config("minmax"), progress=False))
        for key, value in own.items():
            assert torch.equal(ranks[r][f"local/{key}"], value), (r, key)
    assert any(not torch.equal(ranks[0][f"local/{k}"], ranks[1][f"local/{k}"])
               for k in _input_qparams(lowbit.quantize_static(model, batches[:1],
                                                              progress=False)))


def test_sensitivity_agrees_across_ranks(run: Path) -> None:
    ranks = [load_file(str(run / f"ptq_rank{r}.safetensors")) for r in range(WORLD)]
    assert torch.equal(ranks[0]["sensitivity/cosine"], ranks[1]["sensitivity/cosine"])
    single = lowbit.analyze_sensitivity(_model(), _static_config("minmax"),
                                        calibration_data=_batches(),
                                        example_input=_batches()[0], progress=False)
    expected = torch.tensor([r.cosine for r in sorted(single.rows, key=lambda r: r.name)],
                            dtype=torch.float64)
    assert torch.equal(ranks[0]["sensitivity/cosine"], expected)


def test_rank0_save_loads_in_a_single_process(run: Path) -> None:
    loaded = lowbit.load(run / "ptq_model", model=MnistCNN())
    expected = lowbit.quantize_static(_model(), _batches(), progress=False)
    x = _batches()[1]
    assert torch.equal(loaded(x), expected(x))


def test_qat_qparams_identical_across_ranks_every_step(run: Path) -> None:
    ranks = [load_file(str(run / f"qat_rank{r}.safetensors")) for r in range(WORLD)]
    synced = [k for k in ranks[0] if k.startswith("sync1/")]
    assert len(synced) >= QAT_STEPS * len(LAYERS)
    for key in synced:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # every 3rd step: identical on the sync step, whatever happened in between
    for name in LAYERS:
        key = f"sync3/step3/{name}"
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # without sync the ranks drift apart: the test above could fail
    assert not all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]
                   if k.startswith("sync0/"))


def test_qat_converts_identically_and_rank0_files_load_anywhere(run: Path) -> None:
    ranks = [load_file(str(run / f"qat_rank{r}.safetensors")) for r in range(WORLD)]
    for key in ranks[0]:
        if key.startswith("sync1/converted") or key in ("sync1/output", "sync1/bn_mean"):
            assert torch.equal(ranks[0][key], ranks[1][key]), key
    x = _batches()[0]
    loaded = lowbit.load(run / "qat_model", model=MnistCNN())  # a single process
    assert torch.equal(loaded(x), ranks[0]["sync1/output"])
    preparer = lowbit.QATPreparer(_qat_config(1))
    qat = preparer.prepare_for_qat(_model())
    lowbit.load_checkpoint(run / "qat.safetensors", qat)
    assert torch.equal(preparer.convert_to_quantized(qat)(x), ranks[0]["sync1/output"])


def test_qat_under_fsdp2_converts_identically(run: Path) -> None:
    ranks = [load_file(str(run / f"fsdp_rank{r}.safetensors")) for r in range(WORLD)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key


def test_a_failing_rank_makes_the_other_fail_clearly(tmp_path: Path) -> None:
    done = _launch("fail", tmp_path, timeout=90)
    assert done[0].returncode == 0, done[0].stderr[-3000:]  # it caught both errors
    assert done[1].returncode == 3  # os._exit(3) mid-calibration
    raised = json.loads((tmp_path / "raise_rank0.json").read_text())
    own = json.loads((tmp_path / "raise_rank1.json").read_text())
    assert own["type"] == "ValueError" and "NaN" in own["message"], own
    # rank 1's own error travels to rank 0, which stops instead of waiting
    assert raised["type"] == "DistributedSyncError", raised
    assert "rank 1: ValueError: conv1 input has" in raised["message"], raised
    # a rank that hangs: the other stops after the group's timeout, naming it
    hung = json.loads((tmp_path / "hang_rank0.json").read_text())
    assert hung["type"] == "DistributedSyncError", hung
    assert "Ranks 1 failed to pass monitoredBarrier in 4000 ms" in hung["message"], hung
    died = json.loads((tmp_path / "exit_rank0.json").read_text())
    assert died["type"] == "DistributedSyncError", died
    assert "did not answer" in died["message"], died
    # ranks that differ stop at once (the group's timeout is 20 s), each with a clear error
    for how, want in (("no_static", "hold different calibrators"),
                      ("options", "hold different calibrators"),
                      ("gptq_empty", "calibration_data is empty"),
                      ("smooth_empty", "calibration_data is empty"),
                      ("qat_nan", "NaN")):
        for rank in range(WORLD):
            got = json.loads((tmp_path / f"{how}_rank{rank}.json").read_text())
            assert got["type"] is not None and want in got["message"], (how, rank, got)
            assert got["seconds"] < 15, (how, rank, got)
    for rank in range(WORLD):  # ... and what does not differ merges
        got = json.loads((tmp_path / f"counting_rank{rank}.json").read_text())
        assert got["type"] is None, got


def test_example_runs_on_two_processes(tmp_path: Path) -> None:
    """examples/distributed_calibration.py --fast (its check lives here, see test_examples.py):
    it starts 2 gloo processes itself and every claim it prints holds."""
    script = Path(__file__).resolve().parents[1] / "examples" / "distributed_calibration.py"
    doc = script.read_text().split('"""')[1]
    assert "torchrun --nproc_per_node=2" in doc and "--fast" in doc and "Expected output" in doc
    env = _clean_env()
    done = subprocess.run([sys.executable, str(script), "--fast", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "input scales identical on every rank and equal to one process on the whole set: " \
           "True" in done.stdout, done.stdout
    assert "converted models identical on every rank: True; reloaded from rank 0's files: " \
           "True" in done.stdout, done.stdout
    assert (tmp_path / "qat_int8").is_dir() and (tmp_path / "ptq_int8").is_dir()


# ---------------------------------------------------------------------- single process
def test_everything_is_a_no_op_in_one_process() -> None:
    assert active_group() is None
    cal = lowbit.create_calibrator("minmax")
    cal(torch.tensor([1.0, -3.0]))
    sync_calibrators({"x": cal})
    assert cal.num_batches == 1
    assert on_rank0(lambda: 7) == 7
    qat = lowbit.prepare_qat(_model(), _qat_config(1)).train()
    qat(_batches()[0])  # no collective is attempted
    assert qat.fc1.input_quantizer.sync_every == 1


def test_configure_qat_sync_refuses_bad_settings() -> None:
    qat = lowbit.prepare_qat(_model())
    with pytest.raises(ValueError, match="every=-1"):
        configure_qat_sync(qat, every=-1)
    hist = lowbit.prepare_qat(_model(), lowbit.QATConfig(activation_observer="percentile"))
    with pytest.raises(ValueError, match=r"conv1\.input: sync_every=4 .*PercentileCalibrator"):
        configure_qat_sync(hist, every=4)
    with pytest.raises(ValueError, match="sync_every"):
        lowbit.QATConfig(sync_every=-2)


def test_distributed_sync_error_is_a_runtime_error() -> None:
    assert issubclass(DistributedSyncError, RuntimeError)


@pytest.mark.parametrize("name", ["minmax", "percentile", "moving_average"])
def test_calibrators_filled_under_inference_mode_still_merge(name: str) -> None:
    """run_calibration fills calibrators under inference_mode; merging them must still work."""
    a, b = lowbit.create_calibrator(name), lowbit.create_calibrator(name)
    with torch.inference_mode():
        a(torch.tensor([1.0, -2.0]))
        b(torch.tensor([4.0, 0.5]))
    a.merge(b)
    assert a.num_batches == 2 and float(a.max_val) == (4.0 if name != "moving_average" else 2.5)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
