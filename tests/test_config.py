"""QuantSpec / QuantizationConfig: validation names the field, JSON round trips (nested
overrides included), presets, and per-layer resolution with ``config_for``."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.config import GRANULARITIES, QuantizationConfig, QuantSpec


# ------------------------------------------------------------------------ QuantSpec
@pytest.mark.parametrize("bits, signed, narrow, qmin, qmax, dtype", [
    (8, True, False, -128, 127, torch.int8),
    (8, True, True, -127, 127, torch.int8),
    (8, False, False, 0, 255, torch.uint8),
    (8, False, True, 1, 255, torch.uint8),
    (4, True, False, -8, 7, torch.int8),
    (4, False, False, 0, 15, torch.uint8),
    (2, True, False, -2, 1, torch.int8),
    (2, True, True, -1, 1, torch.int8),
])
def test_quantspec_code_range(bits, signed, narrow, qmin, qmax, dtype):
    spec = QuantSpec(bits=bits, signed=signed, narrow_range=narrow)
    assert (spec.qmin, spec.qmax, spec.storage_dtype) == (qmin, qmax, dtype)


@pytest.mark.parametrize("kwargs, field", [
    ({"bits": 1}, "bits"),
    ({"bits": 9}, "bits"),
    ({"bits": "8"}, "bits"),
    ({"bits": False}, "bits"),
    ({"granularity": "per_row"}, "granularity"),
    ({"granularity": "per_group"}, "group_size"),
    ({"granularity": "per_group", "group_size": 0}, "group_size"),
    ({"granularity": "per_group", "group_size": 32.0}, "group_size"),
    ({"granularity": "per_group", "group_size": True}, "group_size"),  # had been group size 1
    ({"granularity": "per_channel", "group_size": 32}, "group_size"),
    ({"axis": 1.5}, "axis"),
    ({"axis": True}, "axis"),
])
def test_quantspec_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"QuantSpec\.{field}"):
        QuantSpec(**kwargs)


def test_quantspec_is_frozen_and_with_revalidates():
    spec = QuantSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 4  # type: ignore[misc]
    assert spec.with_(bits=4).bits == 4 and spec.bits == 8
    with pytest.raises(ValueError, match="bits"):
        spec.with_(bits=12)


def test_quantspec_from_dict_refuses_unknown_keys_by_name():
    with pytest.raises(ValueError, match="bogus"):
        QuantSpec.from_dict({"bits": 8, "bogus": 1})


@st.composite
def valid_specs(draw: st.DrawFn) -> QuantSpec:
    granularity = draw(st.sampled_from(GRANULARITIES))
    kwargs = dict(bits=draw(st.integers(2, 8)), signed=draw(st.booleans()),
                  symmetric=draw(st.booleans()), narrow_range=draw(st.booleans()),
                  granularity=granularity, axis=draw(st.integers(-3, 3)))
    if granularity == "per_group":
        kwargs["group_size"] = draw(st.sampled_from([1, 16, 32, 64, 128]))
    return QuantSpec(**kwargs)


@given(spec=valid_specs())
def test_quantspec_dict_and_json_round_trip(spec):
    data = json.loads(json.dumps(spec.to_dict()))
    assert QuantSpec.from_dict(data) == spec


# ------------------------------------------------------------------ QuantizationConfig
@pytest.mark.parametrize("kwargs, field", [
    ({"mode": "fast"}, "mode"),
    ({"weights": "int8"}, "weights"),
    ({"activations": "int8"}, "activations"),
    ({"mode": "weight_only", "activations": QuantSpec()}, "activations"),
    ({"mode": "dynamic", "activations": None}, "activations"),
    ({"activations": QuantSpec(granularity="per_channel")}, "activations"),
    ({"mode": "static", "activations": QuantSpec(granularity="per_token")}, "granularity"),
    ({"weights": QuantSpec(granularity="per_token")}, "weights"),
    ({"calibrator": ""}, "calibrator"),
    ({"calibrator": None}, "calibrator"),
    ({"skip_layers": ["fc1", 3]}, "skip_layers"),
    ({"layer_overrides": {3: None}}, "layer_overrides"),
    ({"layer_overrides": {"fc1": "int8"}}, r"layer_overrides\['fc1'\]"),
    ({"skip_layers": 5}, "skip_layers must be a list"),  # had been "'int' object is not ..."
    ({"calibrator_kwargs": [1, 2]}, "calibrator_kwargs must be a dict"),
    ({"layer_overrides": ["fc1"]}, "layer_overrides must be a dict"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantizationConfig(**kwargs)


def test_config_from_dict_refuses_unknown_keys_by_name():
    with pytest.raises(ValueError, match="calibratr"):
        QuantizationConfig.from_dict({"calibratr": "minmax"})
    nested = QuantizationConfig().to_dict()
    nested["layer_overrides"] = {"fc1": {"weights": {"bits": 8, "signs": True}}}
    with pytest.raises(ValueError, match="signs"):
        QuantizationConfig.from_dict(nested)


def _nested_config() -> QuantizationConfig:
    inner = QuantizationConfig.int4_weight_only(group_size=64, skip_layers=("lm_head",),
                                                layer_overrides={"*.gate": None})
    static = QuantizationConfig.int8_static(calibrator="percentile",
                                            calibrator_kwargs={"percentile": 99.9, "bins": 4096})
    return QuantizationConfig(
        weights=QuantSpec(bits=7, symmetric=False, granularity="per_channel", axis=1),
        mode="dynamic", calibrator="entropy", calibrator_kwargs={"num_quantized_bins": 128},
        skip_layers=("classifier", "encoder.*.norm"),
        layer_overrides={"decoder.*": inner, "encoder.0.attn": static, "head": None},
    )


def test_config_json_round_trip_with_nested_overrides():
    cfg = _nested_config()
    text = cfg.to_json()
    assert json.loads(text) == cfg.to_dict()  # plain JSON, nothing custom
    back = QuantizationConfig.from_json(text)
    assert back == cfg and hash(back) == hash(cfg) and back.to_json() == text
    assert back.layer_overrides["decoder.*"].layer_overrides["*.gate"] is None
    assert back.layer_overrides["encoder.0.attn"].calibrator_kwargs["percentile"] == 99.9
    assert back.layer_overrides["head"] is None
    assert list(back.layer_overrides) == ["decoder.*", "encoder.0.attn", "head"]  # order kept


def test_config_is_immutable_and_copies_its_mappings():
    overrides = {"fc1": None}
    kwargs = {"percentile": 99.0}
    cfg = QuantizationConfig(layer_overrides=overrides, calibrator_kwargs=kwargs)
    overrides["fc2"] = None
    kwargs["percentile"] = 1.0
    assert "fc2" not in cfg.layer_overrides and cfg.calibrator_kwargs["percentile"] == 99.0
    with pytest.raises(TypeError):
        cfg.layer_overrides["fc3"] = None  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mode = "static"  # type: ignore[misc]


def test_skip_layers_accepts_a_single_string():
    assert QuantizationConfig(skip_layers="fc1").skip_layers == ("fc1",)


# ------------------------------------------------------------------------------ presets
def test_preset_int8_dynamic():
    cfg = QuantizationConfig.int8_dynamic()
    assert cfg.mode == "dynamic" and cfg == QuantizationConfig()
    assert cfg.weights == QuantSpec(bits=8, symmetric=True, granularity="per_channel", axis=0)
    assert cfg.activations.granularity == "per_token" and cfg.activations.symmetric
    assert QuantizationConfig.int8_dynamic(per_token=False).activations.granularity == "per_tensor"
    affine = QuantizationConfig.int8_dynamic(per_token=False, symmetric=False).activations
    assert affine == QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor")
    for bad in ({"symmetric": "no"}, {"per_token": 0}):
        with pytest.raises(TypeError, match=f"{next(iter(bad))} must be True or False"):
            QuantizationConfig.int8_dynamic(**bad)


@pytest.mark.parametrize("calibrator", ["minmax", "moving_average", "percentile", "entropy", "mse"])
def test_preset_int8_static(calibrator):
    cfg = QuantizationConfig.int8_static(calibrator=calibrator)
    assert cfg.mode == "static" and cfg.calibrator == calibrator
    assert cfg.weights.granularity == "per_channel" and cfg.weights.bits == 8
    assert cfg.activations == QuantSpec(bits=8, symmetric=False, granularity="per_tensor")


def test_preset_int4_weight_only():
    cfg = QuantizationConfig.int4_weight_only(group_size=64)
    assert cfg.mode == "weight_only" and cfg.activations is None
    assert cfg.weights == QuantSpec(bits=4, symmetric=False, granularity="per_group",
                                    group_size=64)
    assert QuantizationConfig.int4_weight_only(symmetric=True).weights.group_size == 128


def test_preset_int8_weight_only_is_what_quantize_weight_only_uses_for_8_bits():
    from torch import nn

    from lowbit.ptq import quantize_weight_only

    cfg = QuantizationConfig.int8_weight_only(skip_layers=("head",))
    assert cfg.mode == "weight_only" and cfg.activations is None and cfg.is_skipped("head")
    assert cfg.weights == QuantSpec.int8_weight() and cfg.method == "rtn"
    model = nn.Sequential(nn.Linear(8, 8))
    assert quantize_weight_only(model, bits=8)[0].meta() == quantize_weight_only(
        model, config=QuantizationConfig.int8_weight_only())[0].meta()


def test_presets_pass_extra_fields_through():
    cfg = QuantizationConfig.int8_static(skip_layers=("fc3",), calibrator_kwargs={"bins": 512})
    assert cfg.is_skipped("fc3") and cfg.calibrator_kwargs["bins"] == 512


# ---------------------------------------------------------------------------- config_for
def test_config_for_resolution_order():
    conv = QuantizationConfig.int8_static()
    first = QuantizationConfig.int4_weight_only(group_size=32)
    second = QuantizationConfig.int4_weight_only(group_size=64)
    cfg = QuantizationConfig(
        skip_layers=("head", "blocks.*.norm"),
        layer_overrides={"blocks.*": first, "blocks.1*": second, "blocks.1.fc": conv,
                         "aux.*": None, "head": conv},
    )
    assert cfg.config_for("blocks.1.fc") is conv  # an exact name beats every glob
    assert cfg.config_for("blocks.1.proj") is first  # first matching glob in insertion order
    assert cfg.config_for("blocks.3.proj") is first
    assert cfg.config_for("aux.0") is None  # None override = keep in FP32
    assert cfg.config_for("head") is None  # skip_layers beat overrides
    assert cfg.config_for("blocks.2.norm") is None  # skip by glob
    assert cfg.config_for("stem") is cfg  # no match: the config itself
    assert cfg.config_for("blocks") is cfg  # globs match whole names only
    assert cfg.is_skipped("blocks.0.norm") and not cfg.is_skipped("blocks.0.fc")


def test_config_for_globs_are_case_sensitive_fnmatch_patterns():
    cfg = QuantizationConfig(layer_overrides={"Encoder.*": None, "fc[1]": None})
    assert cfg.config_for("encoder.0") is cfg
    assert cfg.config_for("Encoder.0") is None
    assert cfg.config_for("fc1") is None  # fnmatch: [1] is a character class


def test_config_copy_and_deepcopy_share_the_frozen_instance():
    import copy

    inner = QuantizationConfig.int4_weight_only(32)
    cfg = QuantizationConfig.int8_static(calibrator_kwargs={"percentile": 99.9},
                                         layer_overrides={"fc": None, "conv*": inner})
    assert copy.copy(cfg) is cfg and copy.deepcopy(cfg) is cfg
    holder = torch.nn.Linear(2, 2)
    holder.cfg = cfg  # e.g. a module keeping its config: deepcopy of the module works
    clone = copy.deepcopy(holder)
    assert clone.cfg is cfg and clone.weight is not holder.weight
    assert clone.cfg.config_for("conv1") is inner


def test_config_pickles_and_round_trips_equal():
    import pickle

    inner = QuantizationConfig.int4_weight_only(32)
    cfg = QuantizationConfig.int8_static(calibrator="percentile",
                                         calibrator_kwargs={"percentile": 99.9},
                                         skip_layers=("head",),
                                         layer_overrides={"fc": None, "conv*": inner})
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and hash(back) == hash(cfg) and back is not cfg
    assert back.config_for("conv1") == inner and back.config_for("fc") is None
    with pytest.raises(TypeError):  # the mappings are read-only views again
        back.layer_overrides["x"] = None  # type: ignore[index]
    with pytest.raises(TypeError):
        back.calibrator_kwargs["percentile"] = 1.0  # type: ignore[index]


# ------------------------------------------------------- hostile dicts / JSON: clear errors


def _dyn_dict() -> dict:
    return json.loads(json.dumps(QuantizationConfig.int8_dynamic().to_dict()))


@pytest.mark.parametrize("field, value, message", [
    ("mode", 3, "mode=3 is unknown"),
    ("weights", "x", "expects a dict of QuantSpec fields.*got str"),
    ("activations", [1], "expects a dict of QuantSpec fields.*got list"),
    ("skip_layers", "abc", "skip_layers must be a list of layer names, got str"),
    ("layer_overrides", [1, 2], "layer_overrides must be a dict, got list"),
    ("layer_overrides", {"a": 5}, r"layer_overrides\['a'\] must be a config dict or null"),
    ("calibrator", 5, "calibrator must be a registry name"),
    ("unknown", 1, r"unknown field\(s\) \['unknown'\]"),
])
def test_from_dict_with_wrong_types_names_the_field(field: str, value: object,
                                                     message: str) -> None:
    d = _dyn_dict()
    d[field] = value
    with pytest.raises(ValueError, match=message):
        QuantizationConfig.from_dict(d)


@pytest.mark.parametrize("key, value, message", [
    ("bits", "8", "bits='8' is not supported"),
    ("bits", 8.0, "bits=8.0 is not supported"),
    ("symmetric", "yes", "symmetric must be True or False, got 'yes'"),
])
def test_from_dict_spec_fields_are_type_checked(key: str, value: object, message: str) -> None:
    d = _dyn_dict()
    d["weights"][key] = value
    with pytest.raises(ValueError, match=message):
        QuantizationConfig.from_dict(d)


def test_from_json_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ValueError, match=r"expects a dict.*got list"):
        QuantizationConfig.from_json("[1, 2]")


@pytest.mark.parametrize("method, key, value", [
    ("gptq", "clip_search", "yes"), ("gptq", "act_order", 1), ("gptq", "damp", -0.1),
    ("gptq", "damp", True), ("gptq", "block_size", 0), ("gptq", "block_size", 64.0),
    ("awq", "grid", "20"), ("gptq", "damp", float("inf")), ("signround", "lr", float("nan")),
])
def test_method_options_of_the_wrong_type_are_refused(method: str, key: str,
                                                      value: object) -> None:
    with pytest.raises(ValueError, match=rf"method_kwargs\['{key}'\].*takes"):
        QuantizationConfig.int4_weight_only(32, method=method, method_kwargs={key: value})
    good = {"clip_search": True, "act_order": False, "damp": 0.05, "block_size": 64,
            "grid": 10, "lr": 0.01}[key]
    QuantizationConfig.int4_weight_only(32, method=method, method_kwargs={key: good})


def test_a_containers_rule_covers_its_layers_and_the_most_specific_rule_wins():
    """skip_layers / layer_overrides naming a container (a torchvision "classifier"
    Sequential) were silently ignored: its layers stayed quantized. A container's rule now
    covers the layers inside it, and a rule for a layer (or a nearer container) beats it."""
    int4 = QuantizationConfig.int4_weight_only(group_size=32)
    cfg = QuantizationConfig(skip_layers=("classifier",),
                             layer_overrides={"encoder": int4, "encoder.block.1.fc": None,
                                              "classifier.out": int4, "head*": None})
    assert cfg.config_for("classifier.0") is None and cfg.is_skipped("classifier.0")
    assert cfg.config_for("classifier.out") is int4  # its own override beats the container's
    assert cfg.config_for("encoder.block.0.fc") is int4
    assert cfg.config_for("encoder.block.1.fc") is None
    assert cfg.config_for("heads.0.proj") is None  # a glob naming a container
    assert cfg.config_for("classifier_extra") is cfg and cfg.config_for("body.0") is cfg


def test_the_default_activations_follow_the_mode() -> None:
    """QuantizationConfig(mode="static") and (mode="weight_only") raised: the activations
    default was always the dynamic per-token spec, whatever the mode."""
    assert QuantizationConfig(mode="static") == QuantizationConfig.int8_static()
    assert QuantizationConfig(mode="static").activations == QuantSpec.int8_static_activation()
    assert QuantizationConfig(mode="weight_only").activations is None
    assert QuantizationConfig().activations == QuantSpec.int8_dynamic_activation()
    cfg = QuantizationConfig(mode="static", calibrator="entropy")
    assert QuantizationConfig.from_json(cfg.to_json()) == cfg
