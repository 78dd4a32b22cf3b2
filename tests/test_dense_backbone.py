"""The dense iFormer backbone: window equivalences, strict loading, tracing at 512x512."""
import pytest
import timm
import torch

from iformer.dense import window as win
from iformer.dense.backbone import (BackboneWeightsError, IFormerBackbone, load_backbone_weights,
                                    windowed_blocks)
from pipeline import checkpoint


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
def test_windowed_blocks_equal_global_attention_when_the_window_covers_the_map(size):
    model = IFormerBackbone("iformer_t").eval()
    feats = _stage3_input(model, size)
    blocks = model.stages[2].blocks
    with torch.no_grad():
        global_out = blocks(feats)
        windowed = windowed_blocks(blocks, feats, window=16, chunks=16)
    torch.testing.assert_close(windowed, global_out, rtol=1e-4, atol=1e-5)


def test_windows_change_the_result_when_the_map_is_larger():
    model = IFormerBackbone("iformer_t").eval()
    feats = _stage3_input(model, 320)  # 20x20: padded to 32x32, four windows
    with torch.no_grad():
        diff = (windowed_blocks(model.stages[2].blocks, feats, 16, 16) - model.stages[2].blocks(feats)).abs()
    assert diff.max() > 1e-3, "windowed attention must really be local"


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
    # the classifier's features are the backbone's last map
    classifier.eval()
    backbone.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)[-1], classifier.forward_features(x))
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


def test_traces_and_exports_with_static_shapes_at_512():
    model = IFormerBackbone("iformer_t").eval()
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        eager = model(x)
        traced = torch.jit.trace(model, x, check_trace=False)
        exported = torch.export.export(model, (x,))
        for got in (traced(x), exported.module()(x)):
            assert [tuple(o.shape) for o in got] == [(1, 32, 128, 128), (1, 64, 64, 64), (1, 128, 32, 32),
                                                     (1, 256, 16, 16)]
            for a, b in zip(got, eager):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # window arithmetic is Python ints: neither graph computes with sizes
    ops = {str(n.target) for n in exported.graph_module.graph.nodes if n.op == "call_function"}
    assert not any("sym_size" in op for op in ops), sorted(op for op in ops if "sym" in op)
    graph = str(traced.inlined_graph)
    assert not any(op in graph for op in ("aten::Int", "aten::floordiv", "aten::remainder"))


@pytest.mark.slow
def test_fused_backbone_converts_to_core_ml_at_512():
    import coremltools as ct

    model = IFormerBackbone("iformer_t").eval().fuse()
    x = torch.randn(1, 3, 512, 512)
    # Both ways the backbone reaches Core ML: jit.trace, and one static-shape torch.export
    # program as the export stage converts (the window arithmetic is Python ints).
    traced = torch.jit.trace(model, x, check_trace=False)
    exported = torch.export.export(model, (x,)).run_decompositions({})
    for program, inputs in ((traced, [ct.TensorType(name="image", shape=x.shape)]), (exported, None)):
        mlmodel = ct.convert(program, inputs=inputs, convert_to="mlprogram",
                             minimum_deployment_target=ct.target.iOS16)
        outputs = mlmodel.get_spec().description.output
        shapes = [tuple(o.type.multiArrayType.shape) for o in outputs]
        assert [s[-1] for s in shapes] == [128, 64, 32, 16], shapes  # strides 4, 8, 16, 32 at 512


def test_registered_in_mmdet_and_mmseg():
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG

    from iformer.dense.registry import register

    register()
    register()  # idempotent
    for registry in (DET, SEG):
        built = registry.build(dict(type="IFormerBackbone", variant="iformer_t", out_indices=(0, 1, 2, 3)))
        assert isinstance(built, IFormerBackbone)
