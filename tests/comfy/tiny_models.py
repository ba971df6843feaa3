"""Tiny random-weight models in ComfyUI's real classes (COMFYUI.md §5.3).

Each builder returns a ``TinyFamily``: the MODEL (a ``ModelPatcher``), the CLIP
object, and how to sample it. Everything is built inside ``torch.inference_mode()``
like ComfyUI's loaders do (execution.py runs every node under it), with the text
encoder in fp16 (ComfyUI's default text-encoder dtype) unless asked otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from comfy_env import comfyui_path, setup_comfyui

setup_comfyui()

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.sdxl_clip  # noqa: E402
import comfy.supported_models as sm  # noqa: E402
import comfy.supported_models_base as smb  # noqa: E402
import comfy.text_encoders.flux  # noqa: E402
import comfy.text_encoders.wan  # noqa: E402

TINY_CLIP = {"num_hidden_layers": 3, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}
TINY_CLIP_G = {"num_hidden_layers": 3, "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 2}
TINY_T5 = {"num_layers": 3, "d_model": 32, "d_ff": 64, "num_heads": 2, "d_kv": 16, "vocab_size": 32128}
FAMILIES = ("sd15", "sdxl", "flux", "wan21", "wan22_5b")


def init_weights(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """``ops.disable_weight_init`` leaves ``torch.empty``: fill every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def patcher(base: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


@dataclass
class TinyFamily:
    """A tiny model of one family: MODEL, CLIP, and the latent/conditioning it samples with."""

    family: str
    model: Any
    clip: Any
    latent_shape: tuple[int, ...]
    cond_extra: dict[str, Any] = field(default_factory=dict)

    def encode(self, text: str, clip: Any = None) -> list:
        clip = clip or self.clip
        tokens = clip.tokenize(text)
        out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        return [[cond, dict(out, **self.cond_extra)]]

    def sample(
        self, text: str = "a photo of a dog", steps: int = 2, model: Any = None, clip: Any = None, seed: int = 0
    ) -> torch.Tensor:
        model = model or self.model
        latent = torch.zeros(self.latent_shape)
        noise = comfy.sample.prepare_noise(latent, seed)
        pos, neg = self.encode(text, clip), self.encode("", clip)
        return comfy.sample.sample(
            model, noise, steps, 2.0, "euler", "simple", pos, neg, latent, seed=seed, disable_pbar=True
        )


def _clip(target: smb.ClipTarget, te_dtype: torch.dtype, **kw: Any) -> Any:
    opts = dict(kw.pop("model_options", {}))
    opts["dtype"] = te_dtype
    clip = comfy.sd.CLIP(target, model_options=opts, **kw)
    init_weights(clip.cond_stage_model, seed=1)
    return clip


UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 32,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
WAN = {
    "image_model": "wan2.1",
    "model_type": "t2v",
    "dim": 64,
    "ffn_dim": 128,
    "num_heads": 2,
    "num_layers": 2,
    "in_dim": 16,
    "out_dim": 16,
    "text_dim": 32,
    "patch_size": (1, 2, 2),
    "freq_dim": 256,
    "window_size": (-1, -1),
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
}
FLUX = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "vec_in_dim": 32,
    "context_in_dim": 32,
    "hidden_size": 64,
    "mlp_ratio": 4.0,
    "num_heads": 2,
    "depth": 2,
    "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12],
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
}


def _model(mc: Any, seed: int = 0) -> Any:
    mc.set_inference_dtype(torch.float32, None)
    base = mc.get_model({})
    init_weights(base, seed=seed)
    return patcher(base)


def build(family: str, *, te_dtype: torch.dtype = torch.float16) -> TinyFamily:
    """Build the tiny MODEL + CLIP of ``family`` (one of ``FAMILIES``) inside inference mode."""
    with torch.inference_mode():
        if family == "sd15":
            model = _model(sm.SD15(dict(UNET)))
            clip = _clip(
                smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                te_dtype,
                model_options={"clip_l_model_config": TINY_CLIP},
            )
            return TinyFamily(family, model, clip, (1, 4, 8, 8))
        if family == "sdxl":
            # context = concat(clip_l 32, clip_g 48) = 80; pooled (clip_g) = 48
            mc = sm.SDXL(
                dict(
                    UNET,
                    num_classes="sequential",
                    adm_in_channels=48 + 6 * 256,
                    transformer_depth=[0, 1],
                    transformer_depth_output=[0, 0, 1, 1],
                    use_linear_in_transformer=True,
                    context_dim=80,
                )
            )
            mc.unet_config["num_head_channels"] = 16
            model = _model(mc)
            clip = _clip(
                smb.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel),
                te_dtype,
                model_options={"clip_l_model_config": TINY_CLIP, "clip_g_model_config": TINY_CLIP_G},
            )
            return TinyFamily(
                family,
                model,
                clip,
                (1, 4, 8, 8),
                {"width": 64, "height": 64, "crop_w": 0, "crop_h": 0, "target_width": 64, "target_height": 64},
            )
        if family == "flux":
            model = _model(sm.Flux(dict(FLUX)))
            clip = _clip(
                smb.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip()),
                te_dtype,
                model_options={"clip_l_model_config": TINY_CLIP, "t5xxl_model_config": TINY_T5},
            )
            return TinyFamily(family, model, clip, (1, 16, 8, 8), {"guidance": 3.5})
        if family in ("wan21", "wan22_5b"):
            cfg = dict(WAN) if family == "wan21" else dict(WAN, in_dim=48, out_dim=48)
            mc = sm.WAN21_T2V(cfg) if family == "wan21" else sm.WAN22_T2V(cfg)
            model = _model(mc)
            spiece = str(comfyui_path() / "comfy" / "text_encoders" / "t5_pile_tokenizer" / "tokenizer.model")
            clip = _clip(
                smb.ClipTarget(comfy.text_encoders.wan.WanT5Tokenizer, comfy.text_encoders.wan.te()),
                te_dtype,
                tokenizer_data={"spiece_model": spiece},
                model_options={"umt5xxl_model_config": TINY_T5},
            )
            channels = 16 if family == "wan21" else 48
            return TinyFamily(family, model, clip, (1, channels, 2, 8, 8))
    raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")
