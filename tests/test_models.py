"""The network: every variant's structure, the timm-style interface, input handling."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import randomise
from torch import nn

import seqvision
from seqvision.errors import InputError, UnknownModelError
from seqvision.models import BiLSTM2D, Sequencer

# Exact parameter counts from shared/reference/sequencer.md (the authors' code), 1000 classes.
REFERENCE_PARAMS = {
    "sequencer2d_s": 27_651_688,
    "sequencer2d_m": 38_307_688,
    "sequencer2d_l": 54_298_216,
    "sequencer2d_s_392": 27_651_688,
    "sequencer2d_m_392": 38_307_688,
    "sequencer2d_l_392": 54_298_216,
    "sequencer2d_s_unidirectional": 20_991_592,
    "sequencer2d_s_add": 26_545_768,
    "sequencer2d_s_h2x": 45_395_560,
    "sequencer2d_s_without_fc": 25_433_704,
    "sequencer2d_s_vertical": 27_645_544,
    "sequencer2d_s_horizontal": 27_645_544,
    "gru_sequencer2d_s": 24_874_600,
    "rnn_sequencer2d_s": 19_320_424,
    "sequencer2d_l_d4_3x": 96_252_392,
    "v_sequencer_s": 33_016_552,
    "v_sequencer_s_h": 27_645_544,
    "v_sequencer_s_pe": 33_114_856,
}

TINY = dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), hidden_sizes=(4, 8, 8, 8))


def tiny(name="sequencer2d_s", **kw):
    return seqvision.create_model(name, **{**TINY, "num_classes": 10, **kw})


def test_registry_has_every_variant_of_the_reference_table():
    assert sorted(REFERENCE_PARAMS) == seqvision.list_models()
    assert seqvision.list_models("sequencer2d_s_*")[:2] == ["sequencer2d_s_392", "sequencer2d_s_add"]


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_count_matches_reference(name):
    with torch.device("meta"):
        model = seqvision.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS[name]


def test_authors_alias_and_unknown_name():
    with torch.device("meta"):
        assert seqvision.create_model("sequencer2d_vertical").variant == "sequencer2d_s_vertical"
    with pytest.raises(UnknownModelError, match="Did you mean sequencer2d_s"):
        seqvision.create_model("sequencer2d_ss")


def test_sequencer2d_s_shapes_at_224_and_392():
    model = seqvision.create_model("sequencer2d_s").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
        feats = model.forward_intermediates(torch.randn(1, 3, 392, 392), intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(1, 192, 56, 56), (1, 384, 28, 28), (1, 384, 28, 28), (1, 384, 28, 28)]


def test_every_block_sees_a_contiguous_channels_last_stream():
    """The B x H x W x C stream stays dense from the stem on: strided inputs put every LayerNorm and residual add
    on slow strided kernels (measured on an H100: over a third of the forward)."""
    model = seqvision.create_model("sequencer2d_s").eval()
    seen = []
    for stage in model.stages:
        for block in stage.blocks:
            block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    assert len(seen) == 18 and all(seen), seen


@pytest.mark.parametrize("size", [(160, 288), (57, 30), (14, 14)])
def test_any_input_size_including_non_square(size):
    model = tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
        feats = model.forward_features(torch.randn(2, 3, *size))
    assert out.shape == (2, 10)
    assert feats.shape == (2, size[0] // 14, size[1] // 14, 32)


def test_too_small_input_and_wrong_channels_get_clear_errors():
    model = tiny()
    with pytest.raises(InputError, match="too small.*at least 14x14"):
        model(torch.randn(1, 3, 13, 64))
    with pytest.raises(InputError, match=r"expected images of shape \(batch, 3, height, width\)"):
        model(torch.randn(1, 1, 32, 32))
    gray = tiny(in_chans=1)
    assert gray(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    with pytest.raises(InputError, match="floating-point image tensor, got torch.uint8: scale to"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))  # a decoded image fed as is


@pytest.mark.parametrize("engine", ["reference", "traceable", "fused", "auto"])
def test_empty_batch(engine):
    # A batch of 0 images (the tail of a filtered stream): timm's port fails in a reshape; every engine here
    # returns 0 x num_classes and back-propagates.
    from seqvision import ops

    model = tiny(union="cat")
    x = torch.randn(0, 3, 28, 42, requires_grad=True)
    with ops.use_engine(engine):
        out = model(x)
        out.sum().backward()
    assert out.shape == (0, 10) and x.grad.shape == x.shape


@pytest.mark.parametrize(
    "kw",
    [
        dict(cell="gru"),
        dict(cell="rnn"),
        dict(bidirectional=False),
        dict(union="add"),
        dict(union="vertical", hidden_sizes=(8, 16, 16, 16), with_fc=False),
        dict(union="horizontal", hidden_sizes=(8, 16, 16, 16)),
    ],
)
def test_token_mixer_options(kw):
    model = tiny(**kw).eval()
    assert model(torch.randn(1, 3, 28, 42)).shape == (1, 10)


def test_bilstm2d_reads_columns_and_rows():
    # Changing one pixel of a column must change the outputs of that column and of that row only.
    torch.manual_seed(0)
    mixer = BiLSTM2D(16, 4, with_fc=False).eval()
    x = torch.randn(1, 5, 6, 16)
    y = mixer(x)
    x2 = x.clone()
    x2[0, 2, 3] += 1.0
    changed = (mixer(x2) - y).abs().sum(-1)[0] > 1e-7
    expected = torch.zeros(5, 6, dtype=torch.bool)
    expected[:, 3] = True
    expected[2, :] = True
    assert torch.equal(changed, expected)


def test_without_fc_needs_matching_width():
    with pytest.raises(ValueError, match="must equal the width"):
        BiLSTM2D(10, 4, with_fc=False)


def test_vanilla_sequencer_is_causal_in_raster_order_per_direction():
    torch.manual_seed(0)
    model = seqvision.create_model(
        "v_sequencer_s",
        layers=(1, 1, 1, 1),
        embed_dims=(8,) * 4,
        hidden_sizes=(8,) * 4,
        bidirectional=False,
        num_classes=0,
    )
    mixer = model.stages[0].blocks[0].rnn_tokens.eval()
    x = torch.randn(1, 3, 3, 8)
    y = mixer(x)
    x2 = x.clone()
    x2[0, 1, 1] += 1.0  # token 4 in raster order: tokens 0..3 cannot see it
    changed = ((mixer(x2) - y).abs().sum(-1) > 1e-7).flatten()
    assert changed.tolist() == [False] * 4 + [True] * 5


def test_position_embedding_is_resampled_for_other_sizes():
    model = tiny("v_sequencer_s_pe", img_size=56, hidden_sizes=(8, 16, 16, 16)).eval()
    assert model.absolute_pos_embed.shape == (1, 4, 4, 16)
    assert model(torch.randn(1, 3, 84, 112)).shape == (1, 10)
    assert "absolute_pos_embed" in model.no_weight_decay()


def test_token_shuffle_only_in_training():
    torch.manual_seed(0)
    model = tiny("v_sequencer_s", shuffle_tokens=True, hidden_sizes=(8, 16, 16, 16))
    x = torch.randn(1, 3, 56, 56)
    model.eval()
    assert torch.equal(model.forward_features(x), model.forward_features(x))
    model.train()
    torch.manual_seed(1)
    a = model.forward_features(x)
    torch.manual_seed(2)
    b = model.forward_features(x)
    assert not torch.allclose(a, b)


def test_authors_initialisation():
    model = seqvision.create_model("sequencer2d_s", layers=(1, 1, 1, 1))
    assert model.head.fc.weight.abs().max() == 0 and model.head.fc.bias.abs().max() == 0
    block = model.stages[1].blocks[0]
    bound = 1 / math.sqrt(96)
    lstm = block.rnn_tokens.rnn_v
    assert lstm.weight_hh_l0.abs().max() <= bound and lstm.weight_hh_l0.abs().max() > 0.9 * bound
    assert lstm.bias_ih_l0.abs().max() > 0.5 * bound  # biases are uniform too, not zero
    assert 0 < block.mlp_channels.fc1.bias.std() < 1e-5
    assert block.rnn_tokens.fc.bias.abs().max() == 0
    w = block.rnn_tokens.fc.weight  # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= math.sqrt(6 / (384 + 384)) + 1e-7
    conv = model.stem.proj.weight  # lecun normal: std sqrt(1 / fan_in)
    assert abs(conv.std().item() - math.sqrt(1 / (3 * 49))) < 0.1 * math.sqrt(1 / (3 * 49))


def test_linear_and_constant_drop_path_schedules():
    model = seqvision.create_model("sequencer2d_s", drop_path_rate=0.1)
    rates = [
        b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for s in model.stages for b in s.blocks
    ]
    assert rates == pytest.approx([0.1 * k / 17 for k in range(18)])
    const = seqvision.create_model("sequencer2d_s", drop_path_rate=0.1, drop_path_schedule="constant")
    assert {b.drop_path.drop_prob for s in const.stages for b in s.blocks} == {0.1}


def test_forward_head_and_reset_classifier():
    model = tiny().eval()
    x = torch.randn(2, 3, 28, 28)
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)


def test_features_only_nchw_and_nhwc():
    net = tiny(features_only=True)
    outs = net(torch.randn(2, 3, 56, 84))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 8, 12), (2, 32, 4, 6), (2, 32, 4, 6), (2, 32, 4, 6)]
    assert net.feature_info.channels() == [16, 32, 32, 32]
    assert net.feature_info.reduction() == [7, 14, 14, 14]
    nhwc = tiny(features_only=True, out_indices=(1, 3), output_fmt="NHWC")
    assert [tuple(o.shape) for o in nhwc(torch.randn(1, 3, 56, 56))] == [(1, 4, 4, 32), (1, 4, 4, 32)]


def test_forward_intermediates_matches_forward_features():
    model = tiny().eval()
    x = torch.randn(1, 3, 42, 42)
    final, inter = model.forward_intermediates(x, indices=2, output_fmt="NHWC")
    assert len(inter) == 2
    torch.testing.assert_close(final, model.forward_features(x))
    early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    assert early[0].shape == (1, 16, 6, 6)


def test_grad_checkpointing_recomputes_blocks_and_keeps_gradients():
    torch.manual_seed(0)
    model = tiny(drop_path_rate=0.0)
    x = torch.randn(2, 3, 28, 28)
    calls = []
    model.stages[0].blocks[0].norm1.register_forward_pre_hook(lambda *a: calls.append(1))

    model(x).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    assert len(calls) == 1
    model.zero_grad()
    calls.clear()

    model.set_grad_checkpointing(True)
    for p in model.parameters():  # the zero head would make the rest of the gradients vanish
        p.grad = None
    model(x).sum().backward()
    assert len(calls) == 2  # forward, then recomputation in backward
    for a, p in zip(ref, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a)


def test_group_matcher_drives_timm_layer_decay():
    from timm.optim import create_optimizer_v2

    model = tiny()
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) > 3 and scales[-1] == 1.0
    no_decay = [g for g in opt.param_groups if g["weight_decay"] == 0]
    assert sum(len(g["params"]) for g in no_decay) > 0


def test_pretrained_cfg_works_with_timm_data_config():
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=seqvision.create_model("sequencer2d_s", layers=(1, 1, 1, 1)))
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    with torch.device("meta"):
        big = seqvision.create_model("sequencer2d_l_392")
    assert big.pretrained_cfg["input_size"] == (3, 392, 392) and big.pretrained_cfg["crop_pct"] == 1.0
    assert big.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="unknown cell"):
        tiny(cell="transformer")
    with pytest.raises(ValueError, match="unknown union"):
        tiny(union="mul")
    with pytest.raises(ValueError, match="one entry per stage"):
        Sequencer(layers=(1, 1), patch_sizes=(7, 2, 1, 1))


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    model = tiny(num_classes=3)
    x, y = torch.randn(12, 3, 28, 28), torch.arange(12) % 3
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_matches_timm_structure_for_s():
    ours = {k: tuple(v.shape) for k, v in seqvision.create_model("sequencer2d_s").state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in timm.create_model("sequencer2d_s").state_dict().items()}
    assert ours == theirs


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_export_with_dynamic_batch():
    # nn.LSTM unrolls over time when exported, so H and W are fixed here; dynamic image sizes need
    # the fused engine's custom op (see tests of the deployment path).
    from torch.export import Dim, export

    model = tiny().eval()
    ep = export(model, (torch.randn(2, 3, 28, 42),), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    x = torch.randn(5, 3, 28, 42)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "grad"])
def test_channel_mlp_matches_timms_mlp(mode):
    # timm's Mlp is the oracle: same parameter names, same output; without autograd GELU runs in place.
    from timm.layers import Mlp

    from seqvision.models.sequencer import ChannelMlp

    torch.manual_seed(0)
    ours, theirs = ChannelMlp(8, 24), Mlp(8, 24, act_layer=nn.GELU)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 5, 8)
    context = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}[mode]
    seen = []
    ours.fc1.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with context():
        y = ours(x)
    torch.testing.assert_close(y, theirs(x).detach(), atol=1e-6, rtol=0)
    pre = theirs.fc1(x).detach()  # fc1's output: overwritten by GELU only where autograd is off
    torch.testing.assert_close(seen[0].detach(), pre if mode == "grad" else F.gelu(pre), atol=1e-6, rtol=0)
    if mode == "grad":  # the autograd path keeps GELU's input for backward
        y.sum().backward()
        assert ours.fc1.weight.grad is not None and ours.fc1.weight.grad.abs().sum() > 0


def test_channels_last_output_is_declared_as_timm_reads_it():
    model = tiny().eval()
    feats = model.forward_features(torch.randn(1, 3, 56, 84))
    assert model.output_fmt == "NHWC" and model.feature_dim == -1
    assert feats.shape[model.feature_dim] == model.num_features and feats.shape[1:3] == (4, 6)


def test_global_pool_none_returns_the_map_and_avg_pools_again():
    model = tiny(global_pool="").eval()
    x = torch.randn(2, 3, 56, 84)
    assert model(x).shape == (2, 4, 6, 10)  # the classifier on every position, as timm's heads without pooling
    model.reset_classifier(0, "avg")
    assert model(x).shape == (2, 32) and model.global_pool == "avg"
    model.reset_classifier(0, "")
    torch.testing.assert_close(model(x), model.forward_features(x))
    with pytest.raises(ValueError, match="global_pool must be 'avg'"):
        model.reset_classifier(0, "max")
    with pytest.raises(ValueError, match="global_pool must be 'avg'"):
        tiny(global_pool="token")


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_no_variant_claims_a_fixed_input_size(name):
    # Each runs at any size (v_sequencer_s_pe resamples its position embedding: the test above), so none says fixed.
    with torch.device("meta"):
        assert seqvision.create_model(name).pretrained_cfg["fixed_input_size"] is False


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(cell="gru", union="add"),
        dict(cell="rnn", bidirectional=False),
        dict(union="vertical", hidden_sizes=(8, 16, 16, 16), with_fc=False),
        dict(union="horizontal", hidden_sizes=(8, 16, 16, 16)),
    ],
)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_runs_the_reference_path(kw):
    # Token-mixer options beyond the registered variants (tests/test_timm_contract.py scripts those).
    from seqvision import ops

    torch.manual_seed(0)
    model = randomise(tiny(**kw))
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 42, 56)
    with torch.inference_mode(), ops.use_engine("reference"):
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-6, atol=1e-6)


def test_a_token_mixer_alone_is_not_traced():
    with pytest.raises(torch.fx.proxy.TraceError, match="trace the model"):
        torch.fx.symbolic_trace(BiLSTM2D(16, 4))
