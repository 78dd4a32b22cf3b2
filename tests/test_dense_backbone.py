"""The dense iFormer backbone: the official detection backbone's windows (checked against an
oracle written from `detection/iformer.py`'s block lists), layer scale, strict loading,
tracing and export at 512x512 and 640x640."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.iformer import FFN, ConvBlock, RepCPE, SHMABlock

from iformer.dense import window as win
from iformer.dense.backbone import (BackboneWeightsError, IFormerBackbone, checkpoint_layer_scale,
                                    load_backbone_weights, window_span, windowed_blocks)
from iformer.export import dense_backbone
from iformer.models import build_model, has_layer_scale
from pipeline.core import checkpoint


def well_scaled(model, seed=0):
    """Random weights under which windows matter: convolutions drawn with variance 1/fan-in, BN
    affine drawn, BN statistics measured on random images (as a trained network's are), so
    activations stay O(1) through the stages and attention is far from uniform. With timm's
    initial weights (std 0.02) attention is nearly uniform and every placement looks alike."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.reset_running_stats()
                m.momentum = None  # one pass: the statistics of that batch
        model.train()(torch.randn(2, 3, 256, 256, generator=g))
    return model.eval()


# detection/iformer.py (iFormer_m, iFormer_l, iFormer_l2): the stage-3 block list, one letter a
# block: c ConvBlock, p RepCPE, a SHMABlock, f FFN2d; S is the SHMA block marked `wsp1` (the map is
# zero-padded to a multiple of 16 and partitioned before its mixer), R the one marked `wre1` (the
# windows are reversed and the padding cropped after its mixer). Blocks in between run on windows.
OFFICIAL_STAGE3 = {
    "iformer_m": "c" * 9 + "pSf" + "paf" * 2 + "pRf" + "c",
    "iformer_l": "c" * 8 + "pSf" + "paf" * 5 + "pRf" + "paf" + "c",
    "iformer_l2": "c" * 12 + "pSf" + "paf" * 8 + "pRf" + "paf" + "c",
}
KIND = {ConvBlock: "c", RepCPE: "p", SHMABlock: "a", FFN: "f"}


def oracle_partition(x, ws):
    """(B, C, H, W) -> (B * H/ws * W/ws, C, ws, ws), windows cut one by one in batch, row, column order."""
    b, _, h, w = x.shape
    return torch.stack([x[i, :, r:r + ws, c:c + ws] for i in range(b) for r in range(0, h, ws)
                        for c in range(0, w, ws)])


def oracle_reverse(windows, ws, h, w):
    b = windows.shape[0] // ((h // ws) * (w // ws))
    out = windows.new_empty(b, windows.shape[1], h, w)
    n = 0
    for i in range(b):
        for r in range(0, h, ws):
            for c in range(0, w, ws):
                out[i, :, r:r + ws, c:c + ws] = windows[n]
                n += 1
    return out


def official_backbone(model, x, ws=16):
    """The four maps of the official detection backbone, each block computed by `model`'s own module."""
    x = model.stem(x)
    outs = []
    for i, stage in enumerate(model.stages):
        x = stage.downsample(x)
        if i != 2:
            x = stage.blocks(x)
        else:
            for kind, block in zip(OFFICIAL_STAGE3[model.variant], stage.blocks, strict=True):
                if kind == "S":
                    h, w = x.shape[-2:]
                    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
                    x = oracle_partition(F.pad(x, (0, wp - w, 0, hp - h)), ws)  # always, even to one window
                x = block(x)
                if kind == "R":
                    x = oracle_reverse(x, ws, hp, wp)[:, :, :h, :w]
        outs.append(x)
    return outs


def relative_gaps(ours, official):
    """max |ours - official| / max |official|, per map."""
    return [float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, official, strict=True)]


@pytest.mark.parametrize("variant", sorted(OFFICIAL_STAGE3))
def test_official_block_lists_are_timms_stage3(variant):
    blocks = build_model(variant, 0).stages[2].blocks
    assert "".join(KIND[type(b)] for b in blocks) == OFFICIAL_STAGE3[variant].replace("S", "a").replace("R", "a")


slow = pytest.mark.slow


@pytest.mark.parametrize("variant, size", [
    ("iformer_m", (512, 512)), ("iformer_m", (640, 640)), pytest.param("iformer_m", (800, 1333), marks=slow),
    ("iformer_l", (512, 512)), pytest.param("iformer_l", (640, 640), marks=slow),
    pytest.param("iformer_l", (800, 1333), marks=slow), pytest.param("iformer_l2", (512, 512), marks=slow),
    pytest.param("iformer_l2", (640, 640), marks=slow), pytest.param("iformer_l2", (800, 1333), marks=slow),
])
def test_the_backbone_is_the_official_one(variant, size):
    model = well_scaled(IFormerBackbone(variant))
    batch = 1 if size == (800, 1333) else 2
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        official = official_backbone(model, x)
    assert [o.shape for o in ours] == [o.shape for o in official]
    assert max(relative_gaps(ours, official)) <= 1e-5


@pytest.mark.parametrize("variant, size, option", [
    ("iformer_l", 512, {"window_layout": "paper"}),  # the issue measured 0.29 / 0.11 of stages 3 / 4 here
    pytest.param("iformer_m", 640, {"window_padding": "masked"}, marks=slow),  # only padding tells them apart
])
def test_the_oracle_tells_the_named_alternatives_apart(variant, size, option):
    model = well_scaled(IFormerBackbone(variant))
    other = IFormerBackbone(variant, **option).eval()
    other.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gaps = relative_gaps(other(x), official_backbone(model, x))
    assert gaps[:2] == [0.0, 0.0] and min(gaps[2:]) > 1e-2, gaps


@pytest.mark.parametrize("variant, groups, official, paper", [
    # [start, stop) by hand from timm's stage-3 list: prefix convs, CPE/SHMA/FFN triplets, one conv
    ("iformer_t", 3, (7, 14), (7, 13)),    # 6 prefix convs; up to four groups: all windowed
    ("iformer_s", 3, (10, 17), (10, 16)),  # 9 prefix convs
    ("iformer_m", 4, (10, 20), (10, 19)),  # as detection/iformer.py: wsp1 on SHMA 10, wre1 on SHMA 19
    ("iformer_l", 8, (9, 28), (9, 30)),    # wre1 on the 7th SHMA (27): the last triplet is global
    ("iformer_l2", 11, (13, 41), (13, 43)),
    ("iformer_h", 15, (15, 55), (15, 57)),  # 14 prefix convs; more than four groups: all but the last
])
def test_window_span_rule(variant, groups, official, paper):
    blocks = build_model(variant, 0).stages[2].blocks
    assert sum(isinstance(b, SHMABlock) for b in blocks) == groups
    assert window_span(blocks, "official") == official and window_span(blocks, "paper") == paper
    for start, stop in (official, paper):
        assert isinstance(blocks[start], SHMABlock) and isinstance(blocks[start - 1], RepCPE)


@pytest.mark.parametrize("shape, window, chunks", [((2, 32, 32, 48), 16, 16), ((1, 12, 64, 32), 16, 5),
                                                   ((3, 8, 14, 28), 7, 3)])
def test_chunked_partition_equals_plain(shape, window, chunks):
    x = torch.randn(shape)
    plain = win.partition(x, window)
    chunked = win.partition(x, window, chunks)
    assert chunked.shape == (shape[0] * (shape[2] // window) * (shape[3] // window), shape[1], window, window)
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-5)
    back = win.reverse(chunked, window, shape[2], shape[3], chunks)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(win.reverse(plain, window, shape[2], shape[3]), x, rtol=0, atol=1e-5)
    # one window holds one spatial block of every channel
    torch.testing.assert_close(plain[1], x[0, :, :window, window:2 * window])


def test_padding_and_valid_mask():
    assert win.padding(20, 32, 16) == (12, 0)
    mask = win.valid_mask(2, 20, 30, 16, torch.zeros(1))
    assert mask.shape == (2 * 2 * 2, 1, 16, 16)
    assert int(mask.sum()) == 2 * 20 * 30


def _stage3_input(model, size, batch=2):
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        return model.stages[2].downsample(model.stages[1](model.stages[0](model.stem(x))))


@pytest.mark.parametrize("size", [224, 256])  # stage-3 maps of 14x14 (padded to one window) and 16x16
def test_masked_windows_equal_global_attention_when_the_window_covers_the_map(size):
    model = well_scaled(IFormerBackbone("iformer_t"))
    feats = _stage3_input(model, size)
    blocks = model.stages[2].blocks
    with torch.no_grad():
        global_out = blocks(feats)
        masked = windowed_blocks(blocks, feats, window=16, chunks=16, padding="masked")
        official = windowed_blocks(blocks, feats, window=16, chunks=16)
    torch.testing.assert_close(masked, global_out, rtol=1e-4, atol=1e-4)
    # The official code partitions a 14x14 map too: its zero padding then takes part in
    # attention and the CPE convolutions, which global attention never sees.
    gap = float((official - global_out).abs().max() / global_out.abs().max())
    assert gap < 1e-5 if size == 256 else gap > 1e-3


def test_windows_change_the_result_when_the_map_is_larger():
    model = well_scaled(IFormerBackbone("iformer_t"))
    feats = _stage3_input(model, 320)  # 20x20: padded to 32x32, four windows
    with torch.no_grad():
        global_out = model.stages[2].blocks(feats)
        for padding in ("zeros", "masked"):
            diff = (windowed_blocks(model.stages[2].blocks, feats, 16, 16, padding=padding) - global_out).abs()
            assert diff.max() > 1e-2 * global_out.abs().max(), "windowed attention must really be local"


def test_unknown_window_options_are_refused():
    with pytest.raises(ValueError, match="window_layout must be one of"):
        IFormerBackbone("iformer_t", window_layout="swin")
    with pytest.raises(ValueError, match="window_padding one of"):
        IFormerBackbone("iformer_t", window_padding="reflect")


def test_feature_maps_strides_and_out_indices():
    model = IFormerBackbone("iformer_t", out_indices=(1, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 192, 160))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 24, 20), (1, 256, 6, 5)]
    assert model.out_channels == [64, 256] and model.strides == [8, 32]
    with pytest.raises(ValueError, match="out_indices"):
        IFormerBackbone("iformer_t", out_indices=(4,))


def test_norm_eval_keeps_bn_statistics():
    model = IFormerBackbone("iformer_t", norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns)
    before = bns[0].running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(bns[0].running_mean, before)
    assert all(bn.training for bn in IFormerBackbone("iformer_t").train().modules()
               if isinstance(bn, torch.nn.BatchNorm2d))


def test_pretrain_checkpoint_loads_strictly_apart_from_the_head(tmp_path):
    classifier = timm.create_model("iformer_t", num_classes=10)
    path = tmp_path / "model.pt"
    checkpoint.save_weights(path, classifier.state_dict(), variant="iformer_t", num_classes=10, distillation=False,
                            classes=[str(i) for i in range(10)], image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    backbone = IFormerBackbone("iformer_t", pretrained=str(path))
    backbone.init_weights()
    for name, tensor in backbone.state_dict().items():
        torch.testing.assert_close(tensor, classifier.state_dict()[name], rtol=0, atol=0)
    # with global attention the classifier's features are the backbone's last map
    classifier.eval()
    plain = IFormerBackbone("iformer_t", window_size=0).eval()
    plain.load_state_dict(backbone.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x)[-1], classifier.forward_features(x))
    # an official-style file nests the weights under "model"
    load_backbone_weights(IFormerBackbone("iformer_t"), {"model": classifier.state_dict()})


def test_checkpoint_of_another_variant_is_refused(tmp_path):
    other = timm.create_model("iformer_s", num_classes=10).state_dict()
    with pytest.raises(BackboneWeightsError, match="not an iformer_t checkpoint: .*other shape"):
        load_backbone_weights(IFormerBackbone("iformer_t"), {"model": other}, "x.pth")
    with pytest.raises(BackboneWeightsError, match="holds iformer_s, but the backbone is iformer_t"):
        load_backbone_weights(IFormerBackbone("iformer_t"), {"variant": "iformer_s", "state_dict": other})
    with pytest.raises(BackboneWeightsError, match="no weights"):
        load_backbone_weights(IFormerBackbone("iformer_t"), {"epoch": 3})


@pytest.mark.parametrize("size", [512, 640])  # 640: stage-3 maps of 40x40, zero-padded to 48x48
def test_traces_and_exports_with_static_shapes(size):
    model = IFormerBackbone("iformer_t").eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        eager = model(x)
        traced = torch.jit.trace(model, x, check_trace=False)
        exported = torch.export.export(model, (x,))
        for got in (traced(x), exported.module()(x)):
            assert [tuple(o.shape) for o in got] == [(1, 32 * 2 ** i, size // 4 // 2 ** i, size // 4 // 2 ** i)
                                                     for i in range(4)]
            for a, b in zip(got, eager):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # window arithmetic is Python ints: neither graph computes with sizes
    ops = {str(n.target) for n in exported.graph_module.graph.nodes if n.op == "call_function"}
    assert not any("sym_size" in op for op in ops), sorted(op for op in ops if "sym" in op)
    graph = str(traced.inlined_graph)
    assert not any(op in graph for op in ("aten::Int", "aten::floordiv", "aten::remainder"))


@pytest.mark.slow
@pytest.mark.parametrize("size", [512, 640])
def test_fused_backbone_converts_to_core_ml(size):
    import coremltools as ct

    model = IFormerBackbone("iformer_t").eval().fuse()
    x = torch.randn(1, 3, size, size)
    # Both ways the backbone reaches Core ML: jit.trace, and one static-shape torch.export
    # program as the export stage converts (the window arithmetic is Python ints).
    traced = torch.jit.trace(model, x, check_trace=False)
    exported = torch.export.export(model, (x,)).run_decompositions({})
    for program, inputs in ((traced, [ct.TensorType(name="image", shape=x.shape)]), (exported, None)):
        mlmodel = ct.convert(program, inputs=inputs, convert_to="mlprogram",
                             minimum_deployment_target=ct.target.iOS16)
        outputs = mlmodel.get_spec().description.output
        shapes = [tuple(o.type.multiArrayType.shape) for o in outputs]
        assert [s[-1] for s in shapes] == [size // 4 // 2 ** i for i in range(4)], shapes  # strides 4-32


def _save(path, model, variant, **kwargs):
    checkpoint.save_weights(path, model.state_dict(), variant=variant, num_classes=10, distillation=False,
                            classes=[str(i) for i in range(10)], image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3,
                            **kwargs)
    return checkpoint.load_weights(path)


@pytest.mark.slow  # five iFormer-H (99M parameters) built
def test_h_weights_with_layer_scale_go_through_every_builder(tmp_path):
    classifier = build_model("iformer_h", 10).eval()  # official H: a gamma per residual branch
    with torch.no_grad():  # gammas far from their init, so a builder that lost them could not agree
        for name, param in classifier.named_parameters():
            if name.endswith(".gamma"):
                param.copy_(torch.rand(param.shape, generator=torch.Generator().manual_seed(0)) + 0.5)
    weights = _save(tmp_path / "model.pt", classifier, "iformer_h")
    assert weights["layer_scale"] == 1e-6
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.build_from_weights(weights)(x), classifier(x))
        plain = IFormerBackbone("iformer_h", window_size=0, pretrained=str(tmp_path / "model.pt"))
        plain.init_weights()  # strict
        torch.testing.assert_close(plain.eval()(x)[-1], classifier.forward_features(x))
        backbone = IFormerBackbone("iformer_h").eval()
        load_backbone_weights(backbone, weights)
        deployed = dense_backbone("iformer_h", weights["state_dict"])  # layer scale from the keys
        assert max(relative_gaps(deployed(x), backbone(x))) < 1e-4


def test_m_weights_with_explicit_layer_scale_load_in_the_backbone(tmp_path):
    from mmdet.registry import MODELS

    from iformer.dense.registry import register
    from pipeline.config import Config
    from pipeline.dense import configs, finetune

    classifier = build_model("iformer_m", 10, layer_scale=1e-6)
    assert has_layer_scale(classifier.state_dict())
    weights = _save(tmp_path / "weights/m.pt", classifier, "iformer_m", layer_scale=1e-6)
    assert checkpoint_layer_scale(weights) == 1e-6
    assert checkpoint_layer_scale({"model": classifier.state_dict()}) > 0  # official-style file: from its keys
    with pytest.raises(BackboneWeightsError, match=r"26 unexpected .*gamma.* \(layer scale: the backbone is built "
                                                   r"with 0\)"):
        load_backbone_weights(IFormerBackbone("iformer_m"), weights)
    load_backbone_weights(IFormerBackbone("iformer_m", layer_scale=1e-6), weights)
    dense_backbone("iformer_m", weights["state_dict"])
    # The fine-tuning stages build the backbone with the layer scale of their initial weights.
    cfg = Config.model_validate({"model": {"variant": "iformer_m"},
                                 "detection": {"backbone": {"checkpoint": "weights/m.pt"}}})
    init, layer_scale = finetune.initial_weights(cfg, tmp_path, "detection")
    assert layer_scale == 1e-6
    register()
    built = MODELS.build(configs.backbone(cfg.detection, "iformer_m", str(init), layer_scale))
    built.init_weights()  # strict
    torch.testing.assert_close(built.state_dict()["stages.2.blocks.10.mixer.gamma"],
                               classifier.state_dict()["stages.2.blocks.10.mixer.gamma"])


def test_registered_in_mmdet_and_mmseg():
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG

    from iformer.dense.registry import register

    register()
    register()  # idempotent
    for registry in (DET, SEG):
        built = registry.build(dict(type="IFormerBackbone", variant="iformer_t", out_indices=(0, 1, 2, 3)))
        assert isinstance(built, IFormerBackbone)
