"""Tiny, seeded, offline builders for every model family diffrl trains.

Each builder returns the same objects a hub id gives (a diffusers pipeline, or a transformers model and
tokenizer) with random weights and an in-memory tokenizer, so nothing is downloaded. ``save_tiny(kind,
folder)`` writes one with ``save_pretrained``; the normal loading code then opens the folder with
``from_pretrained(folder)`` exactly as it would open ``stabilityai/stable-diffusion-3.5-medium``.

Sizes are chosen so that a forward pass takes milliseconds on one CPU core. They are not meant to make
good pictures; ``scripts/make_tiny_assets.py`` trains the small models that do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffrl.models.tiny_block_dllm import build_sdar, save_llada2, save_sdar
from diffrl.models.tiny_tokenizers import (  # noqa: F401  (re-exported: the tiny models' tokenizers)
    DLLM_CHAT_TEMPLATE,
    T5_CHARS,
    tiny_clip_tokenizer,
    tiny_dllm_tokenizer,
    tiny_pixtral_processor,
    tiny_qwen_tokenizer,
    tiny_t5_tokenizer,
)

TINY_KINDS = ("sd3", "flux", "flux_kontext", "flux2", "flux2_klein", "qwenimage", "wan", "wan22", "wan_i2v",
              "wan22_i2v", "wan22_ti2v", "sd15",
              "sdxl", "animatediff", "dllm", "diffusion_gemma", "sdar", "llada2", "clip", "preferences",
              "video_preferences", "edit_prompts")


def _clip_text_config(projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=514, max_position_embeddings=77,
                          projection_dim=projection_dim, hidden_act="gelu")


def _t5_encoder(d_model: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cls, config_cls = (UMT5EncoderModel, UMT5Config) if umt5 else (T5EncoderModel, T5Config)
    config = config_cls(vocab_size=4 + len(T5_CHARS), d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
                        num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                        pad_token_id=0, eos_token_id=1)
    return cls(config)


def _tiny_vae(latent_channels: int, downsample: int):
    """An AutoencoderKL whose spatial factor is ``downsample`` (1, 2 or 4)."""
    from diffusers import AutoencoderKL

    levels = {1: 1, 2: 2, 4: 3}[downsample]
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8,) * levels, layers_per_block=1, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, sample_size=32,
                         use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035)


def build_sd3(seed: int = 0):
    """A StableDiffusion3Pipeline: 2-layer MMDiT, two CLIP encoders, a T5 encoder, 2x VAE (32 px -> 16x16)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    # joint_attention_dim = T5 width; pooled_projection_dim = the two CLIP projections side by side.
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
    text_encoder = CLIPTextModelWithProjection(_clip_text_config())
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config())
    text_encoder_3 = _t5_encoder(d_model=64)
    vae = _tiny_vae(latent_channels=4, downsample=2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=tiny_t5_tokenizer())


def build_flux(seed: int = 0, pipeline: str = "FluxPipeline"):
    """A FluxPipeline (FLUX.1-dev style: guidance embedding, packed 2x2 latents, img_ids/txt_ids)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    # in_channels = 4 latent channels x (2x2 packing); axes_dims_rope must add up to attention_head_dim.
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    text_encoder = CLIPTextModel(_clip_text_config())
    text_encoder_2 = _t5_encoder(d_model=32)
    vae = _tiny_vae(latent_channels=4, downsample=2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=16, max_image_seq_len=256)
    return getattr(diffusers, pipeline)(transformer=transformer, scheduler=scheduler, vae=vae,
                                        text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(),
                                        text_encoder_2=text_encoder_2, tokenizer_2=tiny_t5_tokenizer())


def build_flux_kontext(seed: int = 0):
    """A FluxKontextPipeline: FLUX.1's parts; the input image's latents join the target's as more tokens."""
    return build_flux(seed, pipeline="FluxKontextPipeline")



def _flux2_parts(joint_attention_dim: int, guidance_embeds: bool) -> dict:
    """FLUX.2's VAE (2x here, 4 latent channels, batch-norm statistics that are not the identity), a
    one-double-block, one-single-block transformer over the 16 folded channels, and its scheduler."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                             layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32, mid_block_add_attention=False)
    vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, 16))
    vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 16))
    # axes_dims_rope (time, row, column, layer) must add up to attention_head_dim.
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2,
                                          joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32,
                                          axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return dict(vae=vae, transformer=transformer, scheduler=scheduler)


def build_flux2(seed: int = 0):
    """A Flux2Pipeline (FLUX.2 [dev]): a tiny Mistral3 text encoder (31 layers of width 8: the pipeline stacks
    hidden states 10, 20 and 30) with a tiny Pixtral vision tower, a Pixtral processor, guidance embedding."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    processor = tiny_pixtral_processor()
    torch.manual_seed(seed)
    vocab = len(processor.tokenizer)
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=vocab, hidden_size=8, intermediate_size=16,
                         num_hidden_layers=31, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                         max_position_embeddings=1024, pad_token_id=processor.tokenizer.pad_token_id),
        vision_config=dict(model_type="pixtral", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=4, patch_size=4, image_size=32),
        image_token_index=processor.tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
        vision_feature_layer=-1)
    return Flux2Pipeline(text_encoder=Mistral3ForConditionalGeneration(config), tokenizer=processor,
                         **_flux2_parts(joint_attention_dim=24, guidance_embeds=True))


def build_flux2_klein(seed: int = 0):
    """A Flux2KleinPipeline (FLUX.2 [klein] base): a tiny Qwen3 text encoder (27 layers of width 8: the
    pipeline stacks hidden states 9, 18 and 27), true classifier-free guidance, no guidance embedding."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=27, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=True))
    return Flux2KleinPipeline(text_encoder=text_encoder, tokenizer=tokenizer,
                              **_flux2_parts(joint_attention_dim=24, guidance_embeds=False))


def build_qwenimage(seed: int = 0):
    """A QwenImagePipeline: 2-block two-stream transformer, a tiny Qwen2.5-VL text encoder (its vision tower
    unused by text-to-image), Qwen-Image's causal VAE (2x here, one frame), packed 2x2 latents."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    text_config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1200,
                       rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
                       **ids)
    vision_config = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                         patch_size=4, temporal_patch_size=2, spatial_merge_size=2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, vocab_size=len(tokenizer), **ids))
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 2.0])
    # in_channels = 4 latent channels x (2x2 packing); axes_dims_rope must add up to attention_head_dim.
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6))
    # Qwen-Image's scheduler: resolution-dependent exponential shift and a terminal sigma of 0.02.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=16, max_image_seq_len=256, shift_terminal=0.02,
                                                time_shift_type="exponential")
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


def build_wan(seed: int = 0):
    """A WanPipeline (Wan 2.1 text-to-video): 3D transformer, UMT5 encoder, causal video VAE (4x temporal)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    text_encoder = _t5_encoder(d_model=32, umt5=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return WanPipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=text_encoder, transformer=transformer,
                       vae=vae, scheduler=scheduler)


def build_wan22(seed: int = 0):
    """A Wan 2.2-style WanPipeline: two experts (``transformer`` above ``boundary_ratio``, ``transformer_2``
    below), otherwise the tiny Wan 2.1 (the boundary is 0.5 here so that few steps reach both)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    pipe = build_wan(seed)
    torch.manual_seed(seed + 1)
    low = WanTransformer3DModel.from_config(pipe.transformer.config)
    return WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, transformer=pipe.transformer,
                       transformer_2=low, vae=pipe.vae, scheduler=pipe.scheduler, boundary_ratio=0.5)


def _own_settings(config) -> dict:
    """A diffusers config without its bookkeeping keys (``_use_default_values`` would make ``from_config``
    drop the very settings we change)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_wan_i2v(seed: int = 0):
    """A WanImageToVideoPipeline (Wan 2.1 I2V): the tiny Wan with 16 + 4 + 16 input channels (noise, first-frame
    mask, first-frame latents) and a tiny CLIP vision encoder whose penultimate features its cross-attention reads."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    pipe = build_wan(seed)
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel.from_config({**_own_settings(pipe.transformer.config), "in_channels": 36,
                                                     "image_dim": 32, "added_kv_proj_dim": 24})
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                              num_hidden_layers=2, image_size=32, patch_size=8))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return WanImageToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                   scheduler=pipe.scheduler, transformer=transformer, image_encoder=vision,
                                   image_processor=processor)


def build_wan22_i2v(seed: int = 0):
    """A Wan 2.2 I2V-A14B-style WanImageToVideoPipeline: two 36-channel experts split at ``boundary_ratio``
    (0.5 here), no image encoder (Wan 2.2 conditions on the first-frame latents only)."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    pipe = build_wan(seed)
    torch.manual_seed(seed + 2)
    config = {**_own_settings(pipe.transformer.config), "in_channels": 36}
    high, low = WanTransformer3DModel.from_config(config), WanTransformer3DModel.from_config(config)
    return WanImageToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                   scheduler=pipe.scheduler, transformer=high, transformer_2=low, boundary_ratio=0.5)


def build_wan22_ti2v(seed: int = 0):
    """A Wan 2.2 TI2V-5B-style WanPipeline (``expand_timesteps``: one timestep per token) with the Wan 2.2 VAE's
    layout (residual, 2x2 patchified, 16x spatial). Its checkpoint is text-to-video as saved; opened as a
    ``WanImageToVideoPipeline`` (``model.pipeline``) its first latent frame is the input image's."""
    from diffusers import AutoencoderKLWan, WanPipeline

    pipe = build_wan(seed)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKLWan(base_dim=4, decoder_base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                           out_channels=12, scale_factor_temporal=4, scale_factor_spatial=16,
                           latents_mean=[0.1] * 16, latents_std=[1.5] * 16)
    return WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, transformer=pipe.transformer,
                       vae=vae, scheduler=pipe.scheduler, expand_timesteps=True)


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _ddim_scheduler(beta_schedule: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def build_sd15(seed: int = 0):
    """A StableDiffusionPipeline (SD1.5 layout): epsilon-prediction UNet, one CLIP encoder, DDPM-style schedule."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return StableDiffusionPipeline(unet=_tiny_unet(), scheduler=_ddim_scheduler("scaled_linear"),
                                   vae=_tiny_vae(latent_channels=4, downsample=2),
                                   text_encoder=CLIPTextModel(_clip_text_config()), tokenizer=tiny_clip_tokenizer(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_sdxl(seed: int = 0):
    """A StableDiffusionXLPipeline: two CLIP encoders (hidden states side by side, pooled from the second) and
    a UNet with SDXL's text-time embedding (6 size ids x 8 + the 32-d pooled text = 80)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=64,
                                attention_head_dim=(2, 4), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=80,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    return StableDiffusionXLPipeline(unet=unet, scheduler=_ddim_scheduler("scaled_linear"),
                                     vae=_tiny_vae(latent_channels=4, downsample=2),
                                     text_encoder=CLIPTextModel(_clip_text_config()), tokenizer=tiny_clip_tokenizer(),
                                     text_encoder_2=CLIPTextModelWithProjection(_clip_text_config()),
                                     tokenizer_2=tiny_clip_tokenizer())


def build_animatediff(seed: int = 0):
    """An AnimateDiffPipeline: the tiny SD1.5 UNet plus a motion adapter (temporal attention per block),
    merged by diffusers into a UNetMotionModel; AnimateDiff's linear-beta DDIM schedule."""
    from diffusers import AnimateDiffPipeline, MotionAdapter
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    adapter = MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_norm_num_groups=8,
                            motion_num_attention_heads=2, motion_max_seq_length=16, use_motion_mid_block=False)
    return AnimateDiffPipeline(unet=_tiny_unet(), motion_adapter=adapter, scheduler=_ddim_scheduler("linear"),
                               vae=_tiny_vae(latent_channels=4, downsample=2),
                               text_encoder=CLIPTextModel(_clip_text_config()), tokenizer=tiny_clip_tokenizer())


# Characters of the tiny masked LM: enough for arithmetic, countdown and sudoku traces and short prompts.

def build_dllm(seed: int = 0, hidden_size: int = 64, num_layers: int = 2):
    """A bidirectional masked LM (ModernBERT blocks, global attention) and its tokenizer."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    tokenizer = tiny_dllm_tokenizer()
    torch.manual_seed(seed)
    config = ModernBertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                              num_hidden_layers=num_layers, num_attention_heads=4, max_position_embeddings=512,
                              global_attn_every_n_layers=1, local_attention=512,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, cls_token_id=tokenizer.bos_token_id,
                              sep_token_id=tokenizer.eos_token_id, mask_token_id=tokenizer.mask_token_id,
                              tie_word_embeddings=False)
    model = ModernBertForMaskedLM(config)
    return model, tokenizer


def build_diffusion_gemma(seed: int = 0, hidden_size: int = 64, num_layers: int = 2, canvas_length: int = 16,
                          num_experts: int = 4):
    """A DiffusionGemmaForBlockDiffusion (no mask token: uniform noise) and its tokenizer: sliding attention
    layers and a final full-attention one, each with the dense MLP beside a top-2 mixture of ``num_experts``
    experts, as in the 26B-A4B checkpoint; a 16-token canvas; a one-layer vision tower (the class always
    builds one; the tiny trainers never show it a picture)."""
    from transformers import (
        DiffusionGemmaConfig,
        DiffusionGemmaForBlockDiffusion,
        DiffusionGemmaTextConfig,
        Gemma4VisionConfig,
    )

    tokenizer = tiny_dllm_tokenizer(mask_token=False)
    torch.manual_seed(seed)
    text = DiffusionGemmaTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        global_head_dim=16, sliding_window=64, max_position_embeddings=1024,
        layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"],
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, num_experts=num_experts, top_k_experts=2,
        moe_intermediate_size=hidden_size)
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64,
                                pooling_kernel_size=2)
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas_length,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  bos_token_id=tokenizer.bos_token_id)
    return DiffusionGemmaForBlockDiffusion(config), tokenizer


def build_clip(seed: int = 0, image_size: int = 32, vision_sizes: dict | None = None):
    """A CLIPModel with a CLIPProcessor (resize, center crop to ``image_size``, CLIP normalization); the tiny
    text tower, and a vision tower of ``vision_sizes`` (hidden_size, intermediate_size, num_attention_heads,
    num_hidden_layers, patch_size; default: a tiny one; the benchmarks use real ViT sizes)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(seed)
    sizes = vision_sizes or dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                 patch_size=8)
    vision = CLIPVisionConfig(image_size=image_size, projection_dim=32, **sizes)
    config = CLIPConfig(text_config=_clip_text_config().to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tiny_clip_tokenizer(max_length=77))
    return model, processor


_BUILDERS = {"sd3": build_sd3, "flux": build_flux, "flux_kontext": build_flux_kontext, "flux2": build_flux2,
             "flux2_klein": build_flux2_klein, "qwenimage": build_qwenimage,
             "wan": build_wan, "wan_i2v": build_wan_i2v, "wan22_i2v": build_wan22_i2v,
             "wan22_ti2v": build_wan22_ti2v,
             "wan22": build_wan22, "sd15": build_sd15,
             "sdxl": build_sdxl, "animatediff": build_animatediff,
             "dllm": build_dllm, "diffusion_gemma": build_diffusion_gemma, "sdar": build_sdar,
             "clip": build_clip}


def save_preferences(folder: str | Path, *, num_rows: int = 8, num_frames: int | None = None, seed: int = 0) -> Path:
    """A preference folder in the layout ``PreferenceData`` reads: ``metadata.jsonl`` rows ``{caption, winner,
    loser}`` with 48x40 PNGs (or, with ``num_frames``, folders of frames). Winners are warm (red-dominant) and
    losers cool (blue-dominant), so a preference-trained model has something to learn."""
    import json

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    colors = {"winner": torch.tensor([0.85, 0.35, 0.2]), "loser": torch.tensor([0.2, 0.35, 0.85])}
    shapes = ["circle", "square", "triangle", "star"]
    rows = []
    for i in range(num_rows):
        row = {"caption": f"a warm {shapes[i % len(shapes)]} number {i}"}
        for role, color in colors.items():
            frames = num_frames or 1
            pixels = (color.view(1, 3, 1, 1) + 0.15 * torch.randn(frames, 3, 40, 48, generator=generator)).clamp(0, 1)
            images = [Image.fromarray((p.permute(1, 2, 0) * 255).round().byte().numpy()) for p in pixels]
            if num_frames is None:
                images[0].save(folder / f"{i:03d}_{role}.png")
                row[role] = f"{i:03d}_{role}.png"
            else:
                (folder / f"{i:03d}_{role}").mkdir(exist_ok=True)
                for j, image in enumerate(images):
                    image.save(folder / f"{i:03d}_{role}" / f"{j:03d}.png")
                row[role] = f"{i:03d}_{role}"
        rows.append(row)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def save_edit_prompts(folder: str | Path, *, num_rows: int = 4, seed: int = 0) -> Path:
    """An image-editing prompt folder: ``metadata.jsonl`` rows ``{prompt, image}`` with noisy colour PNGs of
    different sizes (40x48 and 32x32: input images are resized to the output size)."""
    import json

    from PIL import Image

    folder = Path(folder)
    (folder / "inputs").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    colors = ["red", "green", "blue", "yellow"]
    rows = []
    for i in range(num_rows):
        height, width = (40, 48) if i % 2 else (32, 32)
        base = torch.rand(3, 1, 1, generator=generator)
        pixels = (base + 0.2 * torch.randn(3, height, width, generator=generator)).clamp(0, 1)
        Image.fromarray((pixels.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / "inputs" / f"{i:03d}.png")
        rows.append({"prompt": f"make the background {colors[i % len(colors)]}", "image": f"inputs/{i:03d}.png"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def build_tiny(kind: str, seed: int = 0):
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny model {kind!r}; choose one of {', '.join(TINY_KINDS)}")
    return _BUILDERS[kind](seed=seed)


def save_tiny(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny model and ``save_pretrained`` it (safetensors) into ``folder``."""
    folder = Path(folder)
    if kind in ("preferences", "video_preferences"):
        return save_preferences(folder, num_frames=5 if kind == "video_preferences" else None, seed=seed)
    if kind == "edit_prompts":
        return save_edit_prompts(folder, seed=seed)
    if kind == "sdar":
        return save_sdar(folder, seed=seed)
    if kind == "llada2":
        return save_llada2(folder, seed=seed)
    built = build_tiny(kind, seed=seed)
    if isinstance(built, tuple):
        for part in built:
            part.save_pretrained(folder)
    else:
        built.save_pretrained(folder, safe_serialization=True)
    return folder


if __name__ == "__main__":  # python -m diffrl.models.tiny KIND FOLDER
    import sys

    if len(sys.argv) != 3 or sys.argv[1] not in TINY_KINDS:
        sys.exit(f"usage: python -m diffrl.models.tiny {{{','.join(TINY_KINDS)}}} FOLDER")
    print(save_tiny(sys.argv[1], sys.argv[2]))
