"""timm's own model tests on every seqvision variant, and the timm tools built on the model interface.

The tests named ``test_model_*`` mirror the tests of the same name in timm's ``tests/test_models.py`` (from timm's
repository, for the pinned timm 1.0.31; the file is not part of timm's wheel): the same steps, assertions and
tolerances, written here rather than copied. What differs is only what the issue allows: the factory and the model
list (every ``seqvision.list_models()`` variant through ``seqvision.create_model``, and timm's own ``sequencer2d_s``
through ``timm.create_model`` as a control where timm runs that test on it), smaller images (timm's
``_get_input_size`` with smaller targets, or a model configured for 64 px where the test reads the configured size),
and "pretrained": a checkpoint file the test writes, passed as timm passes local weights
(``pretrained_cfg_overlay={"file": ...}``). Where timm's assertion cannot fail on a freshly built Sequencer (its
zero-initialised head makes every logit 0), the weights are randomised first, so that "same output" compares real
values. TorchScript of an FX graph runs on three representative variants: scripting and FX tracing are each checked on
all 18 (the comment at the test says why).

The rest covers what the issue adds: TorchScript and FX outputs against eager, the fused engine kept inside FX
graphs, ``feature_cls``, ``prune_intermediate_layers`` and ``set_input_size`` against timm's model as the oracle,
``timm.create_model`` through ``seqvision.register_timm()``, and a timm-style training loop.
"""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import timm
import torch
from helpers import randomise
from PIL import Image
from safetensors.torch import save_file
from timm.layers import get_channel_dim, get_spatial_dim, set_scriptable
from timm.models import adapt_input_conv, get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import seqvision
from seqvision import ops
from seqvision.errors import InputError
from seqvision.models import BiLSTM1D, BiLSTM2D, feature_extractor, timm_name
from seqvision.models.sequencer import pretrained_cfg_for
from seqvision.weights import save_weights, timm_to_authors

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:FutureWarning",
    "ignore:The TorchScript type system doesn't support instance-level annotations:UserWarning",
    "ignore:.*has a 1000-class head and the model:UserWarning",
)

# timm's targets are 128 px (forward, backward, TorchScript, FX) and 96 px (features); these keep CI's two cores busy
# for seconds, not minutes, and still give every stage a grid of more than one token.
TARGET_FWD_SIZE = TARGET_BWD_SIZE = TARGET_JIT_SIZE = TARGET_FX_SIZE = 56
TARGET_FFEAT_SIZE = 56
SMALL_IMG_SIZE = 64  # the configured size for the tests that read it from the model's pretrained_cfg
MAX_NON_STD_SIZE = 320  # timm skips larger fixed sizes in test_model_default_cfgs_non_std
SLOW_VARIANTS = {"sequencer2d_l", "sequencer2d_l_392", "sequencer2d_l_d4_3x"}  # the 54M and 96M-parameter networks


@dataclass(frozen=True)
class Case:
    """One model under test: a seqvision variant, or timm's own Sequencer as the control."""

    source: str  # "seqvision" or "timm"
    name: str

    def create(self, **kwargs) -> torch.nn.Module:
        factory = seqvision.create_model if self.source == "seqvision" else timm.create_model
        return factory(self.name, **kwargs)

    def cfg(self) -> dict:
        """The registered pretrained_cfg, which timm's tests read by model name."""
        if self.source == "seqvision":
            return pretrained_cfg_for(self.name)
        return timm.models.get_pretrained_cfg(self.name).to_dict()

    def small(self) -> dict:
        """create() arguments for a model configured for small images (timm's control has a fixed size)."""
        return {"img_size": SMALL_IMG_SIZE} if self.source == "seqvision" else {}

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


def _param(case: Case):
    return pytest.param(case, id=str(case), marks=[pytest.mark.slow] if case.name in SLOW_VARIANTS else [])


VARIANTS = [_param(Case("seqvision", name)) for name in seqvision.list_models()]
CONTROL = pytest.param(Case("timm", "sequencer2d_s"), id="timm:sequencer2d_s", marks=pytest.mark.slow)
WITH_CONTROL = [*VARIANTS, CONTROL]  # the tests timm itself runs on its sequencer2d_* models


def test_every_variant_is_covered():
    assert [p.values[0].name for p in VARIANTS] == seqvision.list_models() and len(VARIANTS) == 18


def input_size(cfg: dict, target: int | None = None) -> tuple[int, ...]:
    """timm's ``_get_input_size``: the configured size, shrunk to ``target`` unless the model fixes its size."""
    size = cfg["input_size"]
    if cfg.get("fixed_input_size"):
        return size
    if cfg.get("min_input_size"):
        return cfg["min_input_size"] if target and max(size) > target else size
    if target and max(size) > target:
        return tuple(min(x, target) for x in size)
    return size


def eager_and(model: torch.nn.Module, other, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return model(x), other(x)


# -- test_model_forward / test_model_backward ---------------------------------------------------------------------
@pytest.mark.parametrize("case", WITH_CONTROL)
def test_model_forward(case):
    batch_size = 1
    model = case.create(pretrained=False).eval()
    size = input_size(model.default_cfg, TARGET_FWD_SIZE)
    inputs = torch.randn((batch_size, *size))
    outputs = model(inputs)
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), "Output included NaNs"
    try:  # timm: grad checkpointing, where supported, must not change the output
        model.set_grad_checkpointing()
    except Exception:
        return
    outputs2 = model(inputs)
    assert torch.allclose(outputs, outputs2, rtol=1e-4, atol=1e-5), "Output does not match"


@pytest.mark.parametrize("case", WITH_CONTROL)
def test_model_backward(case):
    batch_size = 2
    size = input_size(case.cfg(), TARGET_BWD_SIZE)
    model = case.create(pretrained=False, num_classes=42)
    num_params = sum(p.numel() for p in model.parameters())
    model.train()
    outputs = model(torch.randn((batch_size, *size)))
    outputs.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"No gradient for {n}"
    num_grad = sum(p.grad.numel() for p in model.parameters() if p.grad is not None)
    assert outputs.shape[-1] == 42
    assert num_params == num_grad, "Some parameters are missing gradients"
    assert not torch.isnan(outputs).any(), "Output included NaNs"


# -- test_model_default_cfgs / test_model_default_cfgs_non_std ------------------------------------------------------
def _check_cfg_names(cfg: dict, state_dict: dict) -> None:
    if cfg.get("num_classes", None):
        classifier = cfg["classifier"]
        for c in classifier if isinstance(classifier, (tuple, list)) else (classifier,):
            assert c + ".weight" in state_dict, f"{c} not in model params"
    first_conv = cfg["first_conv"]
    first_conv = (first_conv,) if isinstance(first_conv, str) else first_conv
    assert isinstance(first_conv, (tuple, list))
    for fc in first_conv:
        assert fc + ".weight" in state_dict, f"{fc} not in model params"


@pytest.mark.parametrize("case", VARIANTS)
def test_model_default_cfgs(case):
    """timm runs this one on models whose features are standard maps (not its sequencer2d_*, which declares no
    pool_size); seqvision's declare what it checks: output_fmt, pool_size, unpooled output with global_pool=''."""
    batch_size = 1
    model = case.create(pretrained=False, **case.small()).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg
    pool_size = cfg["pool_size"]
    size = cfg["input_size"]
    output_fmt = getattr(model, "output_fmt", "NCHW")
    spatial_axis = get_spatial_dim(output_fmt)
    assert len(spatial_axis) == 2
    feat_axis = get_channel_dim(output_fmt)
    input_tensor = torch.randn((batch_size, *size))

    outputs = model.forward_features(input_tensor)
    outputs_pre = model.forward_head(outputs, pre_logits=True)
    assert outputs.shape[spatial_axis[0]] == pool_size[0], f"unpooled feature shape {outputs.shape} != config"
    assert outputs.shape[spatial_axis[1]] == pool_size[1], f"unpooled feature shape {outputs.shape} != config"
    assert outputs.shape[feat_axis] == model.num_features
    assert outputs_pre.shape[1] == model.head_hidden_size

    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 2
    assert outputs.shape[1] == model.head_hidden_size
    assert outputs.shape == outputs_pre.shape

    model.reset_classifier(0, "")  # no classifier and no pooling
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 4
    assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]

    model = case.create(pretrained=False, num_classes=0, global_pool="", **case.small()).eval()
    outputs = model.forward(input_tensor)
    assert len(outputs.shape) == 4
    assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]
    _check_cfg_names(cfg, state_dict)


@pytest.mark.parametrize("case", WITH_CONTROL)
def test_model_default_cfgs_non_std(case):
    batch_size = 1
    model = case.create(pretrained=False, **case.small()).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg
    size = input_size(cfg)
    if max(size) > MAX_NON_STD_SIZE:
        pytest.skip("Fixed input size model > limit.")
    input_tensor = torch.randn((batch_size, *size))
    feat_dim = getattr(model, "feature_dim", None)

    outputs = model.forward_features(input_tensor)
    outputs_pre = model.forward_head(outputs, pre_logits=True)
    if feat_dim is None:
        feat_dim = -1 if outputs.ndim == 3 else 1
    assert outputs.shape[feat_dim] == model.num_features
    assert outputs_pre.shape[1] == model.head_hidden_size

    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model.forward(input_tensor)
    assert outputs.shape[feat_dim] == model.head_hidden_size, "pooled num_features != config"
    assert outputs.shape == outputs_pre.shape

    model = case.create(pretrained=False, num_classes=0, **case.small()).eval()
    outputs = model.forward(input_tensor)
    assert outputs.shape[feat_dim] == model.num_features
    _check_cfg_names(cfg, state_dict)


@pytest.mark.parametrize("case", VARIANTS)
def test_default_cfg_pool_size_at_the_configured_size(case):
    """The mirrored tests above run models configured for 64 px; the registered cfg (224 or 392 px) holds too. The
    map's size depends on the patch sizes alone, so one block per stage shows it at a fraction of the cost."""
    model = case.create(layers=(1, 1, 1, 1)).eval()
    cfg = model.default_cfg
    with torch.inference_mode():
        features = model.forward_features(torch.randn(1, *cfg["input_size"]))
    assert cfg == case.cfg() and tuple(features.shape[1:3]) == cfg["pool_size"]
    assert cfg["fixed_input_size"] is False  # every variant runs at other sizes: shown by the small-image tests


# -- test_model_load_pretrained / test_model_features_pretrained -----------------------------------------------------
def write_checkpoint(case: Case, folder):
    """A 1000-class, 3-channel checkpoint of the variant, in the authors', timm's or seqvision's format (one per
    variant in turn), or timm's file for timm's model. Returns (path, its stem weight)."""
    source = case.create(pretrained=False)
    sd = source.state_dict()
    if case.source == "timm":
        fmt = "timm"
    else:
        fmt = ("authors", "timm", "seqvision")[seqvision.list_models().index(case.name) % 3]
    if fmt == "authors":
        path = folder / f"{case.name}.pth"
        torch.save({"model": timm_to_authors(sd)}, path)
    elif fmt == "timm":
        path = folder / f"{case.name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = save_weights(source, folder / f"{case.name}.seqvision.safetensors")
    return path, sd["stem.proj.weight"].clone()


@pytest.mark.parametrize("case", WITH_CONTROL)
def test_model_load_pretrained(case, tmp_path, caplog):
    """Also timm's test_model_features_pretrained (which timm skips for its Sequencer), on the same file."""
    path, stem = write_checkpoint(case, tmp_path)
    overlay = {"file": str(path)}
    try:
        in_chans = 3 if "pruned" in case.name else 1
        m5 = case.create(pretrained=True, pretrained_cfg_overlay=overlay, in_chans=in_chans, num_classes=5)
        m0 = case.create(pretrained=True, pretrained_cfg_overlay=overlay, in_chans=in_chans, num_classes=0)
        m4 = case.create(pretrained=True, pretrained_cfg_overlay=overlay, in_chans=4, num_classes=5)
        if case.source == "seqvision":  # test_model_features_pretrained
            net = case.create(pretrained=True, pretrained_cfg_overlay=overlay, features_only=True)
            assert torch.equal(net.model.stem.proj.weight, stem)
    finally:
        path.unlink()
    # Beyond timm's test (which asserts that these load): the stems are timm's adaptation of the file's.
    for model, chans in ((m5, in_chans), (m0, in_chans), (m4, 4)):
        torch.testing.assert_close(model.stem.proj.weight, adapt_input_conv(chans, stem), rtol=0, atol=0)
    assert m0.num_classes == 0 and m5.num_classes == 5
    if case.source == "seqvision":
        said = [r.getMessage() for r in caplog.records if r.name == "seqvision.weights"]
        assert len(said) == 3 and all("input channels" in s for s in said), said


# -- TorchScript ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", WITH_CONTROL)
def test_model_forward_torchscript(case):
    batch_size = 1
    size = input_size(case.cfg(), TARGET_JIT_SIZE)
    with set_scriptable(True):
        model = case.create(pretrained=False)
    model.eval()
    randomise(model)  # not in timm's test: gives the comparison with eager below real values to compare
    scripted = torch.jit.script(model)
    inputs = torch.randn((batch_size, *size))
    outputs = scripted(inputs)
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), "Output included NaNs"
    # Same outputs as eager: the scripted model runs the reference path (nn.LSTM / GRU / RNN modules).
    with torch.inference_mode():
        eager = model(inputs)
        with ops.use_engine("reference"):
            reference = model(inputs)
    assert eager.abs().max() > 0.1
    torch.testing.assert_close(outputs.detach(), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outputs.detach(), eager, rtol=1e-5, atol=1e-5)


# -- Features ---------------------------------------------------------------------------------------------------------
def _check_feature_maps(feature_info, output_fmt, outputs, size, batch_size):
    expected_channels = feature_info.channels()
    expected_reduction = feature_info.reduction()
    feat_axis, spatial_axis = get_channel_dim(output_fmt), get_spatial_dim(output_fmt)
    assert len(expected_channels) == len(outputs)
    for e, r, o in zip(expected_channels, expected_reduction, outputs, strict=True):
        assert e == o.shape[feat_axis]
        assert o.shape[spatial_axis[0]] <= math.ceil(size[-2] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(size[-1] / r) + 1
        assert o.shape[0] == batch_size
        assert not torch.isnan(o).any()


@pytest.mark.parametrize("case", VARIANTS)
def test_model_forward_features(case):
    batch_size = 1
    model = case.create(pretrained=False, features_only=True).eval()
    assert len(model.feature_info.channels()) >= 3
    size = input_size(model.default_cfg, TARGET_FFEAT_SIZE)
    output_fmt = getattr(model, "output_fmt", "NCHW")
    _check_feature_maps(model.feature_info, output_fmt, model(torch.randn((batch_size, *size))), size, batch_size)


@pytest.mark.parametrize("case", VARIANTS)
def test_model_forward_intermediates_features(case):
    batch_size = 1
    model = case.create(pretrained=False, features_only=True, feature_cls="getter").eval()
    size = input_size(model.default_cfg, TARGET_FFEAT_SIZE)
    output_fmt = getattr(model, "output_fmt", "NCHW")
    _check_feature_maps(model.feature_info, output_fmt, model(torch.randn((batch_size, *size))), size, batch_size)


@pytest.mark.parametrize("case", VARIANTS)
def test_model_forward_intermediates(case):
    batch_size = 1
    model = case.create(pretrained=False).eval()
    feature_info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(feature_info.channels()) >= 3
    size = input_size(model.default_cfg, TARGET_FFEAT_SIZE)
    inputs = torch.randn((batch_size, *size))
    output_fmt = "NCHW"  # timm: set by forward_intermediates' argument, not the model's attribute
    output, intermediates = model.forward_intermediates(inputs, output_fmt=output_fmt)
    _check_feature_maps(feature_info, output_fmt, intermediates, size, batch_size)
    assert torch.allclose(output, model.forward_features(inputs))
    model.set_grad_checkpointing()
    output3, _ = model.forward_intermediates(inputs, output_fmt="NCHW")
    assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5), "Output does not match"


@pytest.mark.parametrize("name", ["sequencer2d_s_392", "v_sequencer_s_pe"])
def test_features_only_keeps_the_preprocessing(name):
    """The wrapper carries the model's pretrained_cfg, so timm's data config reads 392 px and crop 1.0 from it."""
    from timm.data import resolve_data_config

    for feature_cls in ("getter", "fx"):
        net = seqvision.create_model(name, features_only=True, feature_cls=feature_cls)
        assert net.default_cfg is net.pretrained_cfg and "classifier" not in net.pretrained_cfg
        assert resolve_data_config(model=net) == resolve_data_config(model=seqvision.create_model(name))
    assert resolve_data_config(model=net)["input_size"] == ((3, 392, 392) if name.endswith("392") else (3, 224, 224))


def test_feature_cls_names_the_choices():
    with pytest.raises(ValueError, match="feature_cls must be one of getter, fx"):
        seqvision.create_model("sequencer2d_s", features_only=True, feature_cls="hook")
    with pytest.raises(ValueError, match="output_fmt 'NHWC'"):
        seqvision.create_model("sequencer2d_s", features_only=True, feature_cls="fx", output_fmt="NCHW")


# -- FX ---------------------------------------------------------------------------------------------------------------
def _create_fx_model(model, train: bool = False):
    """timm's helper: torchvision's feature extractor on the graph's output node(s), with timm's leaf modules and
    autowrapped functions (for train, the nodes that feed the train graph's output)."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes = [eval_nodes[-1]]
    train_return_nodes = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        graph_node_names = [n.name for n in graph_nodes]
        output_node_indices = [-graph_node_names.index(node_name) for node_name in output_node_names]
        train_return_nodes = [train_nodes[ix] for ix in output_node_indices]
    return create_feature_extractor(
        model,
        train_return_nodes=train_return_nodes,
        eval_return_nodes=eval_return_nodes,
        tracer_kwargs=tracer_kwargs,
    )


@pytest.mark.parametrize("case", WITH_CONTROL)
def test_model_forward_fx(case):
    batch_size = 1
    model = case.create(pretrained=False).eval()
    randomise(model)  # not in timm's test: with the zero head both outputs would be 0 whatever the graph did
    size = input_size(model.default_cfg, TARGET_FX_SIZE)
    with torch.inference_mode():
        inputs = torch.randn((batch_size, *size))
        outputs = model(inputs)
        fx_outputs = torch.cat(tuple(_create_fx_model(model)(inputs).values()))
    assert outputs.abs().max() > 0.1
    assert torch.all(fx_outputs == outputs)
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), "Output included NaNs"


@pytest.mark.parametrize("case", WITH_CONTROL)
def test_model_backward_fx(case):
    batch_size = 2
    size = input_size(case.cfg(), TARGET_FX_SIZE)
    model = case.create(pretrained=False, num_classes=42)
    model.train()
    num_params = sum(p.numel() for p in model.parameters())
    model = _create_fx_model(model, train=True)
    outputs = torch.cat(tuple(model(torch.randn((batch_size, *size))).values()))
    outputs.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"No gradient for {n}"
    num_grad = sum(p.grad.numel() for p in model.parameters() if p.grad is not None)
    assert outputs.shape[-1] == 42
    assert num_params == num_grad, "Some parameters are missing gradients"
    assert not torch.isnan(outputs).any(), "Output included NaNs"


# TorchScript of an FX graph: each part is checked on every variant (test_model_forward_torchscript, the FX tests);
# what the combination adds is the graph's code around the kept modules, which these cover: 2D LSTM / GRU mixers,
# 1D mixers with a position embedding, and timm's own model.
FX_TORCHSCRIPT = [
    p for p in WITH_CONTROL if p.values[0].name in ("sequencer2d_s", "gru_sequencer2d_s", "v_sequencer_s_pe")
]


@pytest.mark.slow
@pytest.mark.parametrize("case", FX_TORCHSCRIPT)
def test_model_forward_fx_torchscript(case):
    batch_size = 1
    size = input_size(case.cfg(), TARGET_JIT_SIZE)
    with set_scriptable(True):
        model = case.create(pretrained=False)
    model.eval()
    randomise(model)  # for the comparison with eager below, not in timm's test
    scripted = torch.jit.script(_create_fx_model(model))
    inputs = torch.randn((batch_size, *size))
    with torch.inference_mode():
        outputs = torch.cat(tuple(scripted(inputs).values()))
        eager = model(inputs)
    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), "Output included NaNs"
    torch.testing.assert_close(outputs, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["v_sequencer_s_pe"])
def test_model_forward_torchscript_with_features_fx(name):
    batch_size = 1
    size = input_size(pretrained_cfg_for(name), TARGET_JIT_SIZE)
    with set_scriptable(True):
        model = seqvision.create_model(name, pretrained=False, features_only=True, feature_cls="fx")
    model.eval()
    model = torch.jit.script(model)
    with torch.inference_mode():
        outputs = model(torch.randn((batch_size, *size)))
    assert isinstance(outputs, list)
    for tensor in outputs:
        assert tensor.shape[0] == batch_size
        assert not torch.isnan(tensor).any(), "Output included NaNs"


def _mixer_paths(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (BiLSTM1D, BiLSTM2D))}


@pytest.mark.parametrize("case", VARIANTS)
def test_fx_tracers_keep_every_output(case):
    """torch.fx.symbolic_trace and torchvision's create_feature_extractor without timm's tracer settings, and timm's
    feature_cls="fx" extractor: the same logits, stage maps and final features as eager, bit for bit; every token
    mixer stays one call_module node."""
    model = randomise(case.create(pretrained=False, num_classes=10))
    x = torch.randn(2, 3, TARGET_FX_SIZE, TARGET_FX_SIZE + 28)
    graph = torch.fx.symbolic_trace(model)
    calls = {n.target for n in graph.graph.nodes if n.op == "call_module"}
    assert _mixer_paths(model) <= calls
    extractor = create_feature_extractor(model, return_nodes={"stages.1": "stage1", "norm": "final"})
    fx_net = feature_extractor(model, (0, 1, 2, 3), feature_cls="fx")  # create_model(..., feature_cls="fx")'s
    assert type(fx_net).__name__ == "FeatureGraphNet" and fx_net.output_fmt == "NHWC"
    assert fx_net.feature_info.channels() == [i["num_chs"] for i in model.feature_info]
    with torch.inference_mode():
        assert torch.equal(graph(x), model(x))
        got = extractor(x)
        stages = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        assert torch.equal(got["stage1"], stages[1])
        assert torch.equal(got["final"], model.forward_features(x))
        maps = fx_net(x)
    assert len(maps) == 4 and all(torch.equal(m, s) for m, s in zip(maps, stages, strict=True))


@pytest.mark.parametrize("name", ["sequencer2d_s", "gru_sequencer2d_s", "v_sequencer_s"])
def test_fx_graph_runs_the_fused_engine(name, monkeypatch):
    from seqvision.ops import fused

    if not fused.available():
        pytest.skip(f"the fused engine is not available here: {fused.load_error()}")
    model = randomise(seqvision.create_model(name, num_classes=10))
    graph = torch.fx.symbolic_trace(model)
    calls = []
    real = fused.rnn2d_fused
    monkeypatch.setattr(fused, "rnn2d_fused", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 3, 56, 56)
    with torch.inference_mode():
        graph(x)
        assert len(calls) == len(_mixer_paths(model)) == sum(len(s.blocks) for s in model.stages)
        model(x)  # and eager inference, as before tracing existed
    assert len(calls) == 2 * len(_mixer_paths(model))


# -- prune_intermediate_layers, set_input_size: timm's model as the oracle -------------------------------------------
@pytest.mark.parametrize("indices", [1, 2, [0, 2], [1]])
def test_prune_intermediate_layers_matches_timm(indices):
    theirs = randomise(timm.create_model("sequencer2d_s"))
    ours = seqvision.create_model("sequencer2d_s")
    ours.load_state_dict(theirs.state_dict())
    assert ours.prune_intermediate_layers(indices) == theirs.prune_intermediate_layers(indices)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert (ours.num_features, ours.head_hidden_size, ours.num_classes) == (
        theirs.num_features,
        theirs.head_hidden_size,
        theirs.num_classes,
    )
    x = torch.randn(1, 3, 56, 84)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)  # unpooled, no head, as timm's
        got = ours.forward_intermediates(x, indices=indices, intermediates_only=True)
        want = theirs.forward_intermediates(x, indices=indices, intermediates_only=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_set_input_size_resamples_once_what_forward_resampled_each_call():
    from timm.data import resolve_data_config

    model = randomise(seqvision.create_model("v_sequencer_s_pe", layers=(1, 1, 1, 1)))
    x = torch.randn(1, 3, 112, 140)
    with torch.inference_mode():
        before = model(x)
    model.set_input_size((112, 140))
    assert model.absolute_pos_embed.shape == (1, 8, 10, 384) and model.absolute_pos_embed.requires_grad
    with torch.inference_mode():
        assert torch.equal(model(x), before)
    assert resolve_data_config(model=model)["input_size"] == (3, 112, 140)
    assert model.pretrained_cfg["pool_size"] == (8, 10)
    plain = seqvision.create_model("sequencer2d_s", layers=(1, 1, 1, 1))
    plain.set_input_size(288)
    assert plain.default_cfg["input_size"] == (3, 288, 288) and plain.img_size == (288, 288)
    with pytest.raises(InputError, match="below this model's smallest input, 14"):
        plain.set_input_size(10)


# -- timm.create_model through register_timm() -----------------------------------------------------------------------
def test_register_timm_names_every_variant_beside_timms_own():
    names = seqvision.register_timm()
    assert names == [timm_name(n) for n in seqvision.list_models()] == timm.list_models("seqvision_*")
    assert seqvision.register_timm() == names  # again: nothing changes
    assert type(timm.create_model("sequencer2d_s")).__module__ == "timm.models.sequencer"  # timm's own untouched
    assert set(timm.list_models("seqvision_*", pretrained=True)) == {
        "seqvision_sequencer2d_s",
        "seqvision_sequencer2d_m",
        "seqvision_sequencer2d_l",
    }
    model = timm.create_model("seqvision_gru_sequencer2d_s", num_classes=7, drop_path_rate=0.1, bn_momentum=None)
    assert isinstance(model, seqvision.models.Sequencer) and model.variant == "gru_sequencer2d_s"
    assert model.num_classes == 7 and model.default_cfg["architecture"] == "gru_sequencer2d_s"
    assert timm.models.get_pretrained_cfg_value("seqvision_sequencer2d_l_392", "input_size") == (3, 392, 392)
    net = timm.create_model("seqvision_sequencer2d_s", features_only=True, feature_cls="fx", out_indices=(1, 3))
    assert net.feature_info.channels() == [384, 384]
    with pytest.raises(ValueError, match="no pretrained tag 'in22k'"):
        timm.create_model("seqvision_sequencer2d_s.in22k")


def test_timm_create_model_loads_a_local_checkpoint(tmp_path):
    seqvision.register_timm()
    source = randomise(seqvision.create_model("sequencer2d_s", layers=(1, 1, 1, 1)))
    path = tmp_path / "s.pth"
    torch.save({"model": timm_to_authors(source.state_dict())}, path)  # the authors' layout
    model = timm.create_model(
        "seqvision_sequencer2d_s", layers=(1, 1, 1, 1), pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    )
    # timm's own checkpoint_path= goes through timm's loader: seqvision's files (timm's key layout) load there too
    native_file = save_weights(source, tmp_path / "s.safetensors")
    native = timm.create_model("seqvision_sequencer2d_s", layers=(1, 1, 1, 1), checkpoint_path=str(native_file))
    x = torch.randn(1, 3, 56, 56)
    with torch.inference_mode():
        assert torch.equal(model.eval()(x), source(x))
        assert torch.equal(native.eval()(x), source(x))


# -- A timm training script, unchanged but for the model name ----------------------------------------------------------
def timm_style_training(model_name: str, steps: int = 16) -> tuple[float, float]:
    """The model, data and optimiser set-up of timm's train.py (create_model, resolve_data_config, create_transform,
    create_optimizer_v2 with layer decay) on scikit-learn's 8x8 digits as RGB images; returns the loss on a fixed
    evaluation batch before and after ``steps`` training steps."""
    from sklearn.datasets import load_digits
    from timm.data import create_transform, resolve_data_config
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    args = dict(img_size=32, input_size=None, in_chans=None, mean=None, std=None, interpolation="", crop_pct=None)
    model = timm.create_model(model_name, pretrained=False, in_chans=3, num_classes=10, drop_path_rate=0.05)
    data_config = resolve_data_config(args, model=model)
    train_tf = create_transform(**data_config, is_training=True, hflip=0.0, scale=(0.6, 1.0))
    eval_tf = create_transform(**data_config)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=2e-3, weight_decay=0.05, layer_decay=0.75)
    assert len({g["lr_scale"] for g in optimizer.param_groups}) > 3  # layer decay really applies

    digits = load_digits()
    images = [Image.fromarray((d * 255 / 16).astype(np.uint8)).convert("RGB") for d in digits.images]
    labels = torch.as_tensor(digits.target)
    eval_x = torch.stack([eval_tf(im) for im in images[-128:]])
    loss_fn = torch.nn.CrossEntropyLoss()

    def eval_loss() -> float:
        model.eval()
        with torch.inference_mode():
            return loss_fn(model(eval_x), labels[-128:]).item()

    before = eval_loss()
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images) - 128, (64,), generator=g)
        x = torch.stack([train_tf(images[i]) for i in idx])
        loss = loss_fn(model(x), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, eval_loss()


def test_timm_training_script_runs_on_a_seqvision_model():
    seqvision.register_timm()
    before, after = timm_style_training("seqvision_sequencer2d_s")
    assert before == pytest.approx(math.log(10), abs=1e-4)  # the authors' zero-initialised head
    assert after < 0.8 * before, (before, after)


@pytest.mark.slow
def test_timm_training_script_control_on_timms_sequencer():
    before, after = timm_style_training("sequencer2d_s")
    assert after < 0.8 * before, (before, after)
