"""Tiny, complete pipelines of the partially supported families (attention kept whole, feed-forwards slimmed):
Qwen-Image, Wan 2.1, LTX-Video, CogView4 and HunyuanDiT, built offline from configurations in code.

Each pipeline is the real diffusers class with every component it has when downloaded: the denoiser from
``denoiser_zoo`` (sizes adjusted to the text encoders), a real VAE, the family's scheduler, and its text
encoder(s) with tokenizers made from character vocabularies (no files, no download): Qwen2.5-VL (a 1-layer text
model with a 1-block vision tower), UMT5 / T5, GLM, BERT + mT5 (a T5 encoder, as diffusers loads mT5).
``PIPELINES[name].call`` gives the small call settings (size, frames, text lengths) each runs at in a test.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import diffusers
import torch
from denoiser_zoo import _cogview4, _hunyuan, _ltx, _qwen, _wan
from tokenizers import Tokenizer, models, pre_tokenizers, processors

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.-' "


def _t5_tokenizer(max_length: int = 24):
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -2.0) for c in CHARS.strip()]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _t5(tokenizer, d_model: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    return model_cls(config_cls(vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=d_model // 2,
                                num_layers=1, num_heads=2, relative_attention_num_buckets=8, pad_token_id=0,
                                eos_token_id=1, decoder_start_token_id=0)).eval()


def _byte_chars() -> list[str]:
    """The byte-level alphabet of GPT-2-style BPE (printable bytes stand for themselves, the others are shifted
    past 255): a vocabulary holding these 256 characters covers any text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(special + _byte_chars())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": special[1:]})
    return tokenizer


def _qwen_text_encoder(tokenizer, hidden: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = 2
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 1]}, max_position_embeddings=1024,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0),
        vision_config=dict(depth=1, hidden_size=8, intermediate_size=8, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[0], spatial_merge_size=2, patch_size=2, temporal_patch_size=1),
        vocab_size=len(tokenizer), hidden_size=hidden, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _glm_tokenizer():
    """A character-level fast tokenizer (a WordLevel model over single characters) that starts every text with
    GLM's two prefix tokens, as the real one does (an empty negative prompt still has tokens)."""
    from transformers import PreTrainedTokenizerFast

    prefix = ["[gMASK]", "<sop>"]
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<unk>", *prefix, *CHARS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", special_tokens=[(t, vocab[t]) for t in prefix])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", unk_token="<unk>",
                                   padding_side="left")


def _bert_tokenizer():
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(CHARS.strip())
    vocab = {t: i for i, t in enumerate(specials + chars + ["##" + c for c in chars])}
    return BertTokenizer(vocab=vocab, model_max_length=77)


def _bert(tokenizer, hidden: int):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=80)).eval()


def _glm(tokenizer, hidden: int):
    from transformers import GlmConfig, GlmModel

    return GlmModel(GlmConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                              pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512)).eval()


def qwen_image(seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = _qwen_tokenizer()
    vae = diffusers.AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                           latents_std=[1.0] * 4).eval()
    # the zoo's transformer: 16 packed channels (4 latent channels x 2x2), text width 12
    return diffusers.QwenImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
                                       text_encoder=_qwen_text_encoder(tokenizer, 12), tokenizer=tokenizer,
                                       transformer=_qwen())


def wan(seed: int = 0, second_expert: bool = False):
    """Wan 2.1 (one transformer); ``second_expert`` gives Wan 2.2's layout (``transformer_2`` below
    ``boundary_ratio``)."""
    torch.manual_seed(seed)
    tokenizer = _t5_tokenizer()
    vae = diffusers.AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                     latents_std=[1.0] * 4).eval()
    extra = dict(transformer_2=_wan(), boundary_ratio=0.5) if second_expert else {}
    return diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=_t5(tokenizer, 16, umt5=True), vae=vae,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                 transformer=_wan(), **extra)


def ltx_video(seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = _t5_tokenizer()
    vae = diffusers.AutoencoderKLLTXVideo(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False), decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False).eval()
    return diffusers.LTXPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
                                 text_encoder=_t5(tokenizer, 16), tokenizer=tokenizer, transformer=_ltx())


def _vae_2d(blocks: int):
    """An AutoencoderKL downsampling by 2^(blocks-1)."""
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                                   up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(4,) * blocks,
                                   layers_per_block=1, latent_channels=4, norm_num_groups=2, sample_size=32).eval()


def cogview4(seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = _glm_tokenizer()
    return diffusers.CogView4Pipeline(tokenizer=tokenizer, text_encoder=_glm(tokenizer, 8), vae=_vae_2d(2),
                                      transformer=_cogview4(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def hunyuan_dit(seed: int = 0):
    """HunyuanDiT's call pads BERT to 77 and mT5 to 256 tokens and computes its RoPE grid for an 8x VAE: the
    transformer's text lengths and the VAE follow."""
    torch.manual_seed(seed)
    bert_tok, t5_tok = _bert_tokenizer(), _t5_tokenizer(256)
    return diffusers.HunyuanDiTPipeline(vae=_vae_2d(4), text_encoder=_bert(bert_tok, 8), tokenizer=bert_tok,
                                        transformer=_hunyuan(text_len=77, text_len_t5=256),
                                        scheduler=diffusers.DDPMScheduler(),
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                        text_encoder_2=_t5(t5_tok, 8), tokenizer_2=t5_tok)


@dataclass
class TinyPipeline:
    """A builder and the small call settings of one tiny pipeline (``call``: size, frames, text lengths; the
    ``slim_kwargs`` split them into pipe.slim's own arguments and its ``call_kwargs``)."""

    name: str
    make: Callable[..., object]
    call: dict = field(default_factory=dict)

    def slim_kwargs(self) -> dict:
        own = {k: v for k, v in self.call.items() if k in ("height", "width")}
        rest = {k: v for k, v in self.call.items() if k not in own}
        return own | ({"call_kwargs": rest} if rest else {})


PIPELINES: dict[str, TinyPipeline] = {p.name: p for p in (
    TinyPipeline("qwen_image", qwen_image, dict(height=32, width=32, max_sequence_length=64)),
    TinyPipeline("wan", wan, dict(height=32, width=32, num_frames=5, max_sequence_length=24)),
    TinyPipeline("ltx_video", ltx_video, dict(height=32, width=32, num_frames=9, max_sequence_length=24)),
    TinyPipeline("cogview4", cogview4, dict(height=16, width=16, max_sequence_length=32)),
    TinyPipeline("hunyuan_dit", hunyuan_dit, dict(height=32, width=32, use_resolution_binning=False)),
)}


