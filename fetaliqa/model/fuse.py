"""Inference-time rewrites of a FetalIQAModel: same function, fewer passes over memory.

``inference_view(model)`` returns a model for scoring frames that shares the encoder and
CLS head with ``model`` (no copy of FetalCLIP's 1.2 GB) and owns a copy of the SEG decoder
with every BatchNorm folded into the convolution before it (``fold_batchnorm``), the
depthwise 2x2 transposed convolutions done as one broadcast multiply-add
(``DepthwiseUpsample2x``) and, with ``channels_last``, the decoder in NHWC with its 1x1
convolutions as matrix products (``Pointwise``); ``model`` is left untouched, so it still
trains and exports. All are exact up to float reassociation (~1e-7 relative). On the CPU
they make the decoder ~3x faster (docs/bench.md). ``quantize_encoder_linears`` (CPU only,
opt-in, in place) swaps the encoder's ``nn.Linear`` layers for int8 dynamically quantised
ones: the MLPs (2/3 of a ViT block's MACs) and, by default, the attention projections too,
after rewriting ``nn.MultiheadAttention`` (which reads its weights directly) as
``LinearAttention``. Measured in ``fetaliqa.bench``.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(module: nn.Module) -> int:
    """In place: in every ``nn.Sequential`` under ``module``, a Conv2d directly followed by a
    BatchNorm2d gets the BN's running statistics and affine folded into its weight and bias,
    and the BN becomes ``nn.Identity``. Only valid in eval mode. Returns the number folded."""
    folded = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                seq._modules[b] = nn.Identity()
                folded += 1
    return folded


class DepthwiseUpsample2x(nn.Module):
    """A depthwise ``ConvTranspose2d(c, c, 2, stride=2, groups=c)`` as one broadcast multiply:
    every output pixel is one input pixel times one weight plus the bias, so the result is
    the same (bit for bit up to the order of one add), without the slow generic
    transposed-convolution kernel the CPU otherwise runs (a third of the decoder's time)."""

    def __init__(self, conv: nn.ConvTranspose2d) -> None:
        super().__init__()
        c = conv.in_channels
        # weight (c, 1, kh, kw) -> (1, c, 1, kh, 1, kw): input (y, x) feeds output (2y+kh, 2x+kw)
        self.register_buffer("weight", conv.weight.detach().reshape(c, 2, 2)[None, :, None, :, None, :].clone())
        bias = conv.bias.detach() if conv.bias is not None else conv.weight.new_zeros(c)
        self.register_buffer("bias", bias.reshape(1, c, 1, 1).clone())

    @staticmethod
    def matches(m: nn.Module) -> bool:
        return (type(m) is nn.ConvTranspose2d and m.groups == m.in_channels == m.out_channels
                and m.kernel_size == (2, 2) and m.stride == (2, 2) and m.padding == (0, 0)
                and m.output_padding == (0, 0) and m.dilation == (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if _is_nhwc(x):  # stay in NHWC: (b, h, 1, w, 1, c) x (1, 1, kh, 1, kw, c), no layout copy
            y = x.new_empty(b, h, 2, w, 2, c)  # explicit output: its layout makes the reshape free
            torch.addcmul(self.bias.reshape(c), x.permute(0, 2, 3, 1)[:, :, None, :, None, :],
                          self.weight.permute(0, 2, 3, 4, 5, 1), out=y)
            return y.reshape(b, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
        y = x.new_empty(b, c, h, 2, w, 2)
        torch.addcmul(self.bias[..., None, None], x[:, :, :, None, :, None], self.weight, out=y)
        return y.reshape(b, c, 2 * h, 2 * w)


class Pointwise(nn.Module):
    """A 1x1 ``Conv2d`` as one matrix product over the channels of an NHWC (channels_last)
    input: the CPU's 1x1 convolution otherwise unfolds the input first. NCHW input falls
    back to the convolution."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.register_buffer("weight", conv.weight.detach()[:, :, 0, 0].clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    @staticmethod
    def matches(m: nn.Module) -> bool:
        # one output channel stays a convolution: a matrix-vector product copies its input
        return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1
                and m.out_channels > 1
                and m.padding in ((0, 0), "valid") and m.dilation == (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_nhwc(x):
            return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


def _is_nhwc(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)


class ChannelsLast(nn.Module):
    """Runs ``module(feats, z0)`` (the SEG decoder's call) on channels_last copies of its inputs."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, feats: list[torch.Tensor], z0: torch.Tensor) -> torch.Tensor:
        cl = torch.channels_last
        return self.module([f.contiguous(memory_format=cl) for f in feats], z0.contiguous(memory_format=cl))


def _replace(module: nn.Module, match, make) -> int:
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and match(child):
                parent._modules[name] = make(child)
                n += 1
    return n


def replace_depthwise_upsampling(module: nn.Module) -> int:
    """In place: every depthwise 2x2 stride-2 ConvTranspose2d -> DepthwiseUpsample2x."""
    return _replace(module, DepthwiseUpsample2x.matches, DepthwiseUpsample2x)


def replace_pointwise(module: nn.Module) -> int:
    """In place: every 1x1 Conv2d -> Pointwise."""
    return _replace(module, Pointwise.matches, Pointwise)


def _own_modules(m: nn.Module) -> nn.Module:
    """Shallow copy of ``m`` with its own submodule table (parameters stay shared)."""
    c = copy.copy(m)
    c._modules = dict(m._modules)
    return c


def attention_view(encoder: nn.Module) -> nn.Module:
    """The open_clip vision tower with every block's ``nn.MultiheadAttention`` seen through a
    parameter-sharing ``LinearAttention`` (``encoder`` untouched, no weight copied); the
    encoder itself when it is not laid out as open_clip's ``transformer.resblocks[i].attn``."""
    blocks = getattr(getattr(encoder, "transformer", None), "resblocks", None)
    if blocks is None or not all(type(getattr(b, "attn", None)) is nn.MultiheadAttention for b in blocks):
        return encoder
    enc, tr = _own_modules(encoder), _own_modules(encoder.transformer)
    new_blocks = []
    for b in blocks:
        nb = _own_modules(b)
        nb.attn = LinearAttention(b.attn, share=True)
        new_blocks.append(nb)
    tr.resblocks = nn.ModuleList(new_blocks)
    enc.transformer = tr
    return enc


def inference_view(model: nn.Module, *, fold_bn: bool = True, fast_upsample: bool = True,
                   channels_last: bool = False, sdpa_attention: bool = False) -> nn.Module:
    """An eval-mode twin of a FetalIQAModel for inference (see module docstring); ``model``
    is put in eval mode but otherwise unchanged. fold_bn: ``fold_batchnorm``; fast_upsample:
    ``replace_depthwise_upsampling``; channels_last: decoder in NHWC, its 1x1 convolutions as
    matrix products (``Pointwise``); sdpa_attention: encoder through ``attention_view``."""
    model.eval()
    view = _own_modules(model)  # shares parameters and submodules, owns its table of submodules
    if sdpa_attention:
        view.encoder = attention_view(model.encoder)
    if model.decoder is not None and (fold_bn or fast_upsample or channels_last):
        dec = copy.deepcopy(model.decoder).eval()
        if fold_bn:
            fold_batchnorm(dec)
        if fast_upsample:
            replace_depthwise_upsampling(dec)
        if channels_last:
            replace_pointwise(dec)
            dec = ChannelsLast(dec.to(memory_format=torch.channels_last))
        view.decoder = dec
    return view


class LinearAttention(nn.Module):
    """``nn.MultiheadAttention`` (no bias_k/v, no zero attention, eval) with its projections as
    ``nn.Linear`` modules and ``F.scaled_dot_product_attention``: same outputs, and the
    projections become visible to ``quantize_dynamic``. Called as open_clip calls it:
    ``attn(q, k, v, need_weights=False, attn_mask=None) -> (out, None)``."""

    def __init__(self, mha: nn.MultiheadAttention, share: bool = False) -> None:
        """share: the new Linear layers hold ``mha``'s own Parameters (no copy)."""
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn or not mha._qkv_same_embed_dim:
            raise ValueError("only plain self-attention blocks can be rewritten")
        w = mha.embed_dim
        self.heads, self.batch_first = mha.num_heads, mha.batch_first
        with torch.device("meta") if share else contextlib.nullcontext():
            self.in_proj = nn.Linear(w, 3 * w, bias=mha.in_proj_bias is not None)
            self.out_proj = nn.Linear(w, w, bias=mha.out_proj.bias is not None)
        if share:
            self.in_proj.weight, self.out_proj.weight = mha.in_proj_weight, mha.out_proj.weight
            self.in_proj.bias, self.out_proj.bias = mha.in_proj_bias, mha.out_proj.bias
            return
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None, **_):
        if key is not None and key is not query or value is not None and value is not query:
            raise ValueError("LinearAttention supports self-attention only")
        x = query if self.batch_first else query.transpose(0, 1)  # (B, L, W)
        b, n, w = x.shape
        q, k, v = self.in_proj(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(b, n, w)
        y = self.out_proj(y)
        return (y if self.batch_first else y.transpose(0, 1)), None


def quantize_encoder_linears(model: nn.Module, *, attention: bool = True) -> nn.Module:
    """In place, CPU only: int8 dynamic quantisation of the encoder's ``nn.Linear`` layers
    (weights int8 per tensor, activations quantised per batch at run time). attention: first
    rewrite each ``nn.MultiheadAttention`` as ``LinearAttention`` so its projections (1/3 of
    a block's MACs) are quantised too; else only the MLPs are. Returns model."""
    if any(p.device.type != "cpu" for p in model.encoder.parameters()):
        raise ValueError("int8 dynamic quantisation runs on the CPU only; move the model to 'cpu' first")
    enc = model.encoder.eval()
    if attention:
        # sharing: quantisation replaces these Linear layers anyway, so no fp32 copy is made
        _replace(enc, lambda m: type(m) is nn.MultiheadAttention, lambda m: LinearAttention(m, share=True))
    with warnings.catch_warnings():  # torch.ao.quantization warns it is moving to torchao (not a dependency)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import quantize_dynamic

        model.encoder = quantize_dynamic(enc, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model
