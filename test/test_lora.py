"""LoRA that works: every adapter learns, only adapters/heads change, merge is exact."""

from __future__ import annotations

import pytest
import torch

from fetaliqa.model import ModelConfig, adapter_parameters, build_model, export_model, load_exported

torch.set_num_threads(2)


@pytest.fixture()
def lora_model():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="fetalclip-small", heads=("seg", "cls"), decoder_width=8, encoder_mode="lora")
    m = build_model(cfg)
    for n, p in adapter_parameters(m).items():
        if "lora_B" in n:  # peft starts B at zero (A gets no gradient then); make it non-zero
            torch.nn.init.normal_(p, std=0.02)
    return m


def _step(m, lr=1e-2):
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    x = torch.randn(2, 3, 224, 224)
    out = m(x)
    (out["seg"].sigmoid().mean() + out["cls"].mean()).backward()
    opt.step()


def test_adapters_cover_attention_and_mlp(lora_model):
    names = adapter_parameters(lora_model)
    assert all(n.startswith("encoder.") for n in names)
    for blk in range(6):
        for target in ("attn.lora_A", "attn.base_layer.out_proj.lora_A", "mlp.c_fc.lora_A", "mlp.c_proj.lora_A"):
            assert any(f"resblocks.{blk}.{target}" in n for n in names), (blk, target)
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("encoder.")} == set(names)
    assert len(names) == 6 * 4 * 2  # A and B of attn (in-proj), attn.out_proj, c_fc, c_proj per block


def test_every_adapter_gets_gradient_and_only_trainables_change(lora_model):
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters()}
    lora_model.train()
    _step(lora_model)
    ad = adapter_parameters(lora_model)
    no_grad = [n for n, p in ad.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"adapters without gradient: {no_grad[:5]}"
    changed = {n for n, p in lora_model.named_parameters() if not torch.equal(p, before[n])}
    heads = {n for n, _ in lora_model.named_parameters() if n.startswith(("decoder.", "cls_head."))}
    assert set(ad) <= changed and heads & changed  # every adapter moved, the heads trained
    # peft adapts nn.MultiheadAttention by adding the LoRA delta to the frozen in/out-projection
    # weights around each forward and subtracting it after: those frozen tensors come back
    # equal up to float rounding only. Every other frozen tensor must be bit-identical.
    rounding = {n for n in changed - set(ad) - heads if ".attn.base_layer." in n}
    assert changed - set(ad) - heads - rounding == set()
    for n in rounding:
        p = dict(lora_model.named_parameters())[n]
        assert (p - before[n]).abs().max() <= 1e-6 * before[n].abs().max(), n


def test_the_published_out_proj_target_is_refused():
    from fetaliqa.model import LoraSettings

    with pytest.raises(ValueError, match="out_proj is never called"):
        LoraSettings(targets=("attn.out_proj", "mlp.c_fc"))


def test_attention_adapters_add_alpha_over_r_once(lora_model):
    # the adapted block computes a plain MultiheadAttention whose in- and out-projections each hold
    # base + alpha / r x B A (peft 0.21 alone would add the out-projection's twice)
    a = lora_model.encoder.transformer.resblocks[0].attn
    out = a.base_layer.out_proj
    with torch.no_grad():
        for p in (a.lora_A["default"].weight, out.lora_A["default"].weight):
            torch.nn.init.normal_(p, std=0.05)
    scale = 16 / 8  # the spec's alpha / r
    lora_model.eval()
    x = torch.randn(2, 5, a.base_layer.embed_dim)
    plain = torch.nn.MultiheadAttention(a.base_layer.embed_dim, a.base_layer.num_heads, batch_first=True)
    with torch.no_grad():
        plain.in_proj_weight.copy_(a.base_layer.in_proj_weight + scale * a.lora_B["default"].weight
                                   @ a.lora_A["default"].weight)
        plain.in_proj_bias.copy_(a.base_layer.in_proj_bias)
        plain.out_proj.weight.copy_(out.base_layer.weight + scale * out.lora_B["default"].weight
                                    @ out.lora_A["default"].weight)
        plain.out_proj.bias.copy_(out.base_layer.bias)
        got = a(x, x, x, need_weights=False)[0]
        want = plain(x, x, x, need_weights=False)[0]
    assert (got - want).abs().max() < 1e-5, (got - want).abs().max()


def test_merged_equals_unmerged_and_export_round_trip(lora_model, tmp_path):
    lora_model.train()
    _step(lora_model)
    lora_model.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = lora_model(x)
        export_model(lora_model, tmp_path, {"encoder": "lora"})
        merged = load_exported(tmp_path)
        out = merged(x)
        again = lora_model(x)  # export must not have merged the live model
    assert merged.config.encoder_mode == "lora"
    assert not any("lora_" in k for k in merged.state_dict())
    for k in ref:
        assert torch.allclose(ref[k], out[k], atol=1e-4), (k, (ref[k] - out[k]).abs().max())
        assert torch.equal(ref[k], again[k])
    export_model(merged, tmp_path / "b", {})  # exporting a loaded model gives identical weights
    sd_a, sd_b = merged.state_dict(), load_exported(tmp_path / "b").state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_training_checkpoint_round_trip_exact(lora_model, tmp_path):
    lora_model.train()
    _step(lora_model)
    torch.save(lora_model.state_dict(), tmp_path / "ck.pt")
    fresh = build_model(lora_model.config)
    fresh.load_state_dict(torch.load(tmp_path / "ck.pt", weights_only=True), strict=True)
    a, b = lora_model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lora_model.eval(), fresh.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(lora_model(x)["seg"], fresh(x)["seg"])
