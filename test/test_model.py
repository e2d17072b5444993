"""FetalCLIP backbone geometry, checkpoint loading in all its forms, heads, export/load."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from fetaliqa.model import (ModelConfig, build_model, count_parameters, export_model, is_exported_model,
                            load_exported)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_helpers import write_fetalclip_checkpoint  # noqa: E402

torch.set_num_threads(2)
SMALL = dict(backbone="fetalclip-small", decoder_width=8)


def test_fetalclip_geometry_parameter_counts():
    with torch.device("meta"):  # counts without allocating 1.2 GB
        m = build_model(ModelConfig(backbone="FetalCLIP", heads=("seg", "cls")))
    assert count_parameters(m.encoder) == 303_966_208
    assert count_parameters(m.encoder.transformer.resblocks[0]) == 12_596_224
    assert count_parameters(m.decoder) == 1_591_941
    assert count_parameters(m.cls_head) == 768 + 1
    assert m.config.taps == (6, 8, 12, 24)
    assert count_parameters(m, trainable_only=True) == 1_591_941 + 769  # frozen encoder


def test_small_forward_shapes_and_frozen_encoder():
    cfg = ModelConfig(heads=("seg", "cls"), **SMALL)
    m = build_model(cfg)
    x = torch.randn(2, 3, 224, 224)
    out = m(x)
    assert out["seg"].shape == (2, 1, 224, 224) and out["cls"].shape == (2,)
    enc = m.encode(x)
    assert [f.shape for f in enc["feats"]] == [(2, 128, 14, 14)] * 4
    assert not enc["feats"][0].requires_grad  # frozen: no graph through the encoder, features cacheable
    (out["seg"].mean() + out["cls"].mean()).backward()
    assert all(p.grad is None for p in m.encoder.parameters())
    assert m.decoder.out[-1].weight.grad is not None and m.cls_head.weight.grad is not None


def test_taps_select_blocks():
    m = build_model(ModelConfig(taps=(1, 1, 1, 1), **SMALL)).eval()
    x = torch.randn(1, 3, 224, 224)
    f = m.encode(x)["feats"]
    assert torch.equal(f[0], f[3])
    with pytest.raises(ValueError, match="taps"):
        ModelConfig(taps=(1, 2, 3, 7), **SMALL)
    with pytest.raises(ValueError, match="4 tapped"):
        ModelConfig(taps=(1, 2, 3), **SMALL)
    with pytest.raises(ValueError, match="must not decrease"):
        ModelConfig(taps=(6, 4, 3, 2), **SMALL)


def test_config_round_trip():
    cfg = ModelConfig(heads=("seg", "cls"), encoder_mode="lora", pixel_threshold=0.4, choose_from="all",
                      shape_power=1.5, sweep_prior=(0.8, 0.4, 0.3, 0.1, 0.2, 0.0), **SMALL).with_geometry()
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig.from_dict({**d, "sweep_prior": None}).sweep_prior is None
    for bad in ([1, 1, 1], [0] * 6, [1, 1, 1, 1, 1, -1]):
        with pytest.raises(ValueError, match="sweep_prior"):
            ModelConfig.from_dict({**d, "sweep_prior": bad})
    with pytest.raises(ValueError, match="choose_from"):
        ModelConfig.from_dict({**d, "choose_from": "best"})
    with pytest.raises(ValueError, match="shape_power"):
        ModelConfig.from_dict({**d, "shape_power": -1})
    assert cfg.score_threshold is None and ModelConfig.from_dict({**d, "score_threshold": 0.02}).score_threshold == 0.02
    for bad in (0, -0.1):
        with pytest.raises(ValueError, match="score_threshold"):
            ModelConfig.from_dict({**d, "score_threshold": bad})
    # the temporal window in frames at the challenge's 140 per sweep: the same stretch of sweep at 35
    assert cfg.window_frames_per_sweep is None and cfg.window_at(35) == cfg.window_at(140) == 2
    at_140 = ModelConfig.from_dict({**d, "window_frames_per_sweep": 140})
    assert at_140.window_at(140) == 2 and at_140.window_at(35) == 0.5 and at_140.window_at(280) == 4
    for bad in (0, -140, 1.5):
        with pytest.raises(ValueError, match="window_frames_per_sweep"):
            ModelConfig.from_dict({**d, "window_frames_per_sweep": bad})
    # the mask window: counted like the temporal window; older models (no key) average nothing
    assert cfg.mask_window == 0 and ModelConfig.from_dict({k: v for k, v in d.items() if k != "mask_window"}) == cfg
    assert at_140.mask_window_at(35) == 0 and ModelConfig.from_dict({**d, "mask_window": 2}).mask_window_at(35) == 2
    assert ModelConfig.from_dict({**d, "mask_window": 2, "window_frames_per_sweep": 140}).mask_window_at(35) == 0.5
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="mask_window"):
            ModelConfig.from_dict({**d, "mask_window": bad})
    with_head = {**d, "heads": ["seg", "frame"]}
    assert cfg.frame_threshold is None and ModelConfig.from_dict({**with_head, "frame_threshold": 0.5}).frame_threshold \
        == 0.5
    for bad in ({**with_head, "frame_threshold": 0}, {**d, "frame_threshold": 0.5}):  # no frame head to cut
        with pytest.raises(ValueError, match="frame_threshold"):
            ModelConfig.from_dict(bad)
    # the frame head's views: the frame alone unless set; older models (no key) likewise
    assert cfg.frame_views == ((0.0, False),)
    assert ModelConfig.from_dict({k: v for k, v in d.items() if k != "frame_views"}) == cfg
    views = ModelConfig.from_dict({**d, "frame_views": [[0, False], [6, False], [-6.5, False], [0, True]]})
    assert views.frame_views == ((0.0, False), (6.0, False), (-6.5, False), (0.0, True))
    assert ModelConfig.from_dict(json.loads(json.dumps(views.to_dict()))) == views
    for bad in ([], [[0, 1]], [[float("nan"), False]], [["x", False]], [[0]], 5):
        with pytest.raises(ValueError, match="frame_views"):
            ModelConfig.from_dict({**d, "frame_views": bad})
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**d, "bogus": 1})


def _visual_sd(m):
    return {k: v.clone() for k, v in m.encoder.state_dict().items()}


@pytest.mark.parametrize("form", ["raw_visual", "full_clip", "wrapped_module"])
def test_checkpoint_forms_load(tmp_path, form):
    src = build_model(ModelConfig(**SMALL))
    vis = _visual_sd(src)
    if form == "raw_visual":
        obj = vis
    else:
        obj = {f"visual.{k}": v for k, v in vis.items()}
        obj.update({"logit_scale": torch.tensor(4.6), "token_embedding.weight": torch.zeros(3, 4),
                    "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(6, 2)})
        if form == "wrapped_module":
            obj = {"state_dict": {f"module.{k}": v for k, v in obj.items()}}
    path = tmp_path / "ck.pt"
    torch.save(obj, path)
    m = build_model(ModelConfig(**SMALL), weights=path)
    for k, v in m.encoder.state_dict().items():
        assert torch.equal(v, vis[k]), k


def test_checkpoint_errors_name_file_and_keys(tmp_path):
    vis = _visual_sd(build_model(ModelConfig(**SMALL)))
    truncated = dict(vis)
    del truncated["proj"], truncated["transformer.resblocks.5.mlp.c_fc.weight"]
    truncated["extra.weight"] = torch.zeros(1)
    p = tmp_path / "bad.pt"
    torch.save(truncated, p)
    with pytest.raises(ValueError) as e:
        build_model(ModelConfig(**SMALL), weights=p)
    msg = str(e.value)
    assert str(p) in msg and "proj" in msg and "resblocks.5.mlp.c_fc.weight" in msg and "extra.weight" in msg
    wrong = dict(vis, proj=torch.zeros(3, 3))
    torch.save(wrong, p)
    with pytest.raises(ValueError, match="Shape mismatches.*proj"):
        build_model(ModelConfig(**SMALL), weights=p)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        build_model(ModelConfig(**SMALL), weights=tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_model(ModelConfig(**SMALL), weights=tmp_path / "missing.pt")


def test_export_load_round_trip_without_peft(tmp_path, monkeypatch):
    m = build_model(ModelConfig(heads=("seg", "cls"), **SMALL)).eval()
    export_model(m, tmp_path, {"data": "sim", "epochs": 0, "commit": "abc"})
    assert is_exported_model(tmp_path) and not is_exported_model(tmp_path / "nowhere")
    for f in tmp_path.iterdir():  # readable by the container's non-root user
        assert f.stat().st_mode & 0o044 == 0o044, f
    monkeypatch.setitem(sys.modules, "peft", None)  # loading must not need peft
    m2 = load_exported(tmp_path)
    assert m2.provenance["commit"] == "abc" and m2.config.heads == ("seg", "cls")
    assert m2.config.geometry["vision_cfg"]["layers"] == 6
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a, b = m(x), m2(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _patch16(**kw) -> ModelConfig:
    """A small config whose geometry has 16-pixel patches (the registered one has 14)."""
    geo = json.loads(json.dumps(ModelConfig(**SMALL).open_clip_config()))
    geo["vision_cfg"]["patch_size"] = 16
    return ModelConfig(geometry=geo, **SMALL, **kw)


def test_conv_stem_keeps_the_token_grid_and_round_trips(tmp_path):
    from fetaliqa.model.backbone import ConvStem
    cfg = _patch16(heads=("seg", "cls"), encoder_mode="lora", stem="conv")
    m = build_model(cfg, adapters=False)
    stem = m.encoder.conv1
    assert isinstance(stem, ConvStem)
    convs = [c for c in stem if isinstance(c, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 1] * 4 + [1]  # log2(16) stages, then the 1x1 projection
    assert [c.out_channels for c in convs] == [24, 24, 48, 48, 96, 96, 192, 192, 128]
    x = torch.randn(2, 3, 224, 224)
    assert stem(x).shape == (2, 128, 14, 14) and m.encoder.grid_size == (14, 14)
    (m(x)["seg"].mean()).backward()
    assert convs[0].weight.grad is None  # build_model leaves the encoder frozen until training unfreezes it
    m.eval()
    export_model(m, tmp_path, {"data": "sim"})
    m2 = load_exported(tmp_path)
    assert m2.config.stem == "conv" and isinstance(m2.encoder.conv1, ConvStem)
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m.state_dict().items())
    with torch.no_grad():
        a, b = m(x), m2(x)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)  # same weights; kernels may reassociate
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "stem"}).stem == "patch"


def test_conv_stem_refusals(tmp_path):
    with pytest.raises(ValueError, match="power of 2"):
        ModelConfig(stem="conv", **SMALL)  # the registered small geometry has 14-pixel patches
    with pytest.raises(ValueError, match="stem must be one of"):
        ModelConfig(stem="hybrid", **SMALL)
    with pytest.raises(ValueError, match="only for its patch embedding"):  # before any file is read
        build_model(_patch16(stem="conv"), weights=tmp_path / "w.pt")


def test_frame_head_is_a_pooled_conv_stem_beside_the_encoder_and_round_trips(tmp_path):
    """The frame head reads the model's input, not the encoder: (B,) logits from a ConvStem,
    global average pooling and a linear layer; exported and loaded with the rest."""
    from fetaliqa.model.heads import FrameHead
    m = build_model(ModelConfig(heads=("seg", "frame"), **SMALL)).eval()
    head = m.frame_head
    assert isinstance(head, FrameHead) and sum(p.numel() for p in head.parameters()) == 685_289
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        out = m(x)
        assert out["frame"].shape == (3,) and torch.equal(out["frame"], head(x))
        # batch norm in eval: each frame's logit is its own (no batch statistics)
        assert torch.allclose(head(x[1:2]), out["frame"][1:2], atol=1e-6)
        assert head(torch.randn(2, 3, 112, 112)).shape == (2,)  # any side divisible by 16
    export_model(m, tmp_path, {"data": "sim"})
    m2 = load_exported(tmp_path)
    assert m2.config.heads == ("seg", "frame") and isinstance(m2.frame_head, FrameHead)
    with torch.no_grad():
        b = m2(x)
    assert all(torch.allclose(out[k], b[k], rtol=0, atol=1e-6) for k in out)
    with pytest.raises(ValueError, match="need 'seg'"):
        ModelConfig(heads=("cls", "frame"), **SMALL)
    with pytest.raises(ValueError, match="select_by must be 'seg' or 'cls'"):
        ModelConfig(heads=("seg", "frame"), select_by="frame", **SMALL)


def test_frame_views_average_the_heads_logits_over_rotated_and_mirrored_frames(tmp_path):
    """With ``frame_views`` the frame logit is the mean of the head's logits on each view of the
    input: mirrored = flipped left-right; rotated about the centre, black (pixel 0) where the
    view leaves the frame (a 90-degree turn of a square moves every pixel onto another
    exactly); the SEG output is untouched; the views are exported with the model."""
    m = build_model(ModelConfig(heads=("seg", "frame"), **SMALL)).eval()
    cfg = m.config

    class Weighing(torch.nn.Module):  # a head that reads every pixel differently: views are told apart
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))

        def forward(self, v):
            return (v * self.w).mean((1, 2, 3))

    m.frame_head = head = Weighing()
    x = torch.randn(2, 3, 224, 224)
    black = (-torch.tensor(cfg.mean) / torch.tensor(cfg.std)).view(1, 3, 1, 1)
    with torch.no_grad():
        plain = m(x)
        m.config = dataclasses.replace(cfg, frame_views=((0.0, False), (0.0, True)))
        mirrored = m(x)
        assert torch.allclose(mirrored["frame"], (head(x) + head(x.flip(-1))) / 2, atol=1e-6)
        assert torch.equal(mirrored["seg"], plain["seg"])
        m.config = dataclasses.replace(cfg, frame_views=((90.0, False),))
        turned = m(x)["frame"]
        assert torch.allclose(turned, head(torch.rot90(x, 1, (-2, -1))), atol=1e-5)
        assert not torch.allclose(turned, head(torch.rot90(x, -1, (-2, -1))), atol=1e-3)
        m.config = dataclasses.replace(cfg, frame_views=((45.0, False),))
        # corners leave the frame: a uniform black input stays black, so the view changes nothing
        dark = black.expand(1, 3, 224, 224)
        assert torch.allclose(m(dark)["frame"], head(dark), atol=1e-5)
        assert not torch.allclose(m(x)["frame"], plain["frame"], atol=1e-3)
    trained = build_model(ModelConfig(heads=("seg", "frame"), frame_views=((0.0, False), (0.0, True)), **SMALL))
    export_model(trained, tmp_path, {})
    m2 = load_exported(tmp_path)
    assert m2.config.frame_views == ((0.0, False), (0.0, True))
    with torch.no_grad():
        want = (m2.frame_head(x) + m2.frame_head(x.flip(-1))) / 2
        assert torch.allclose(m2(x)["frame"], want, atol=1e-6)


def test_load_exported_refuses_mismatches(tmp_path):
    export_model(build_model(ModelConfig(**SMALL)), tmp_path, {})
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["config"]["decoder_width"] = 16
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model.safetensors.*do not match.*shape mismatches"):
        load_exported(tmp_path)
    meta["config"]["decoder_width"] = 8
    meta["config"]["geometry"]["vision_cfg"]["width"] = 192
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match"):
        load_exported(tmp_path)
    (tmp_path / "model.json").write_text("{broken")
    with pytest.raises(ValueError, match="model.json is not valid JSON"):
        load_exported(tmp_path)
    assert not is_exported_model(tmp_path)
    (tmp_path / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_exported(tmp_path)


@pytest.mark.slow
def test_full_fetalclip_checkpoint_loads(tmp_path):
    """True FetalCLIP geometry (~1.2 GB fp32 per copy) from a random checkpoint in FetalCLIP's
    key format (full-CLIP `visual.*` keys, wrapped, `module.`-prefixed, a few text keys)."""
    cfg = ModelConfig(backbone="FetalCLIP", heads=("seg",))
    src = build_model(cfg).encoder
    assert count_parameters(src) == 303_966_208
    ref = {k: src.state_dict()[k].clone() for k in ("conv1.weight", "transformer.resblocks.23.mlp.c_proj.weight",
                                                      "proj")}
    path = write_fetalclip_checkpoint(tmp_path / "FetalCLIP_weights.pt", src.state_dict())
    del src
    m = build_model(cfg, weights=path)
    for k, v in ref.items():
        assert torch.equal(m.encoder.state_dict()[k], v), k
    assert len(m.encoder.state_dict()) == 5 + 12 * 24 + 3  # stem 5, 12 per block, ln_post 2 + proj
