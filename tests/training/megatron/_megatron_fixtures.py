"""Shared helpers of the Megatron backend tests: a tiny random Qwen2.5-VL, packed multi-image batches,
and the HF reference log-probs / entropy / think embeddings (per sequence, unpacked).

Weights reach Megatron through the shared mapping (``care_megatron.models.weight_mapping``), as in production.
"""
from __future__ import annotations


import torch

from care_megatron.data.batch import PackedMicroBatch
from care_megatron.rewards.regions import Region

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 290, 291, 292, 293
VOCAB = 300


def tiny_hf_config(tie: bool = False, vocab: int = VOCAB, layers: int = 2):
    from transformers import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         bos_token_id=0, eos_token_id=1, pad_token_id=2),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=tie,
    )
    cfg.text_config.tie_word_embeddings = tie
    return cfg


def tiny_qwen3_vl_config():
    from transformers import Qwen3VLConfig

    cfg = Qwen3VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=1024,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                         pad_token_id=2, tie_word_embeddings=False),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1]),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=False)
    return cfg


def tiny_hf_model(tie: bool = False, seed: int = 0, arch: str = "qwen2_5_vl", layers: int | None = None):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    if arch == "qwen3_vl":
        cfg = tiny_qwen3_vl_config()
        cfg._attn_implementation = "eager"
        model = Qwen3VLForConditionalGeneration(cfg).float().eval()
    else:
        cfg = tiny_hf_config(tie, layers=layers or 2)  # e.g. 4 decoder layers for PP=2 x VP=2
        cfg._attn_implementation = "eager"
        model = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    # larger-than-default init so log-probs are not all ~ -log V (a stronger parity test)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
    return model


def make_sequence(model, generator, n_images: int, text_len: int, response_len: int, grid_hw=(4, 4)):
    """One sequence: [text, (vision_start, pads, vision_end) * n_images, text, response]."""
    vcfg = model.config.vision_config
    merge = vcfg.spatial_merge_size
    patch_dim = getattr(vcfg, "in_channels", 3) * vcfg.temporal_patch_size * vcfg.patch_size ** 2
    ids, pixels, grids = [], [], []
    ids += torch.randint(3, 280, (text_len,), generator=generator).tolist()
    for _ in range(n_images):
        h, w = grid_hw
        pads = (h * w) // merge ** 2
        ids += [VISION_START] + [IMAGE_TOKEN] * pads + [VISION_END]
        pixels.append(torch.randn(h * w, patch_dim, generator=generator))
        grids.append([1, h, w])
    ids += torch.randint(3, 280, (3,), generator=generator).tolist()
    prompt_len = len(ids)
    ids += torch.randint(3, 280, (response_len,), generator=generator).tolist()
    input_ids = torch.tensor(ids)
    grid = torch.tensor(grids) if grids else None
    mm = (input_ids == IMAGE_TOKEN).int()[None]
    if grid is not None:
        position_ids, _ = model.model.get_rope_index(input_ids[None], mm, image_grid_thw=grid)
        position_ids = position_ids[:, 0]
    else:
        position_ids = torch.arange(len(ids)).expand(3, -1).clone()
    loss_mask = torch.zeros(len(ids), dtype=torch.bool)
    loss_mask[prompt_len:] = True
    region = torch.zeros(len(ids), dtype=torch.long)
    think_end = prompt_len + response_len // 2
    region[prompt_len:think_end] = int(Region.THINK)
    region[think_end:] = int(Region.ANSWER)
    return dict(input_ids=input_ids, position_ids=position_ids, pixel_values=torch.cat(pixels) if pixels else None,
                image_grid_thw=grid, loss_mask=loss_mask, region_ids=region)


def pack(seqs: list[dict], pad_to: int | None = None) -> PackedMicroBatch:
    ids = torch.cat([s["input_ids"] for s in seqs])
    pos = torch.cat([s["position_ids"] for s in seqs], dim=1)
    lm = torch.cat([s["loss_mask"] for s in seqs])
    reg = torch.cat([s["region_ids"] for s in seqs])
    lengths = torch.tensor([len(s["input_ids"]) for s in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    num_pad = 0
    if pad_to is not None and pad_to > ids.numel():
        num_pad = pad_to - ids.numel()
        ids = torch.cat([ids, ids.new_full((num_pad,), 2)])
        pos = torch.cat([pos, pos.new_zeros(3, num_pad)], dim=1)
        lm = torch.cat([lm, lm.new_zeros(num_pad)])
        reg = torch.cat([reg, reg.new_zeros(num_pad)])
    pixels = [s["pixel_values"] for s in seqs if s["pixel_values"] is not None]
    grids = [s["image_grid_thw"] for s in seqs if s["image_grid_thw"] is not None]
    return PackedMicroBatch(input_ids=ids, position_ids=pos, cu_seqlens=cu, loss_mask=lm, region_ids=reg,
                            sequence_indices=torch.arange(len(seqs)),
                            pixel_values=torch.cat(pixels) if pixels else None,
                            image_grid_thw=torch.cat(grids) if grids else None, num_pad=num_pad)


def standard_batches(model, seed: int = 1, pad_to: int | None = 96):
    """Two packed micro-batches with 0-2 images per sequence (multi-image packing)."""
    g = torch.Generator().manual_seed(seed)
    a = [make_sequence(model, g, 2, 5, 7), make_sequence(model, g, 0, 4, 6), make_sequence(model, g, 1, 3, 9)]
    b = [make_sequence(model, g, 1, 6, 5, grid_hw=(4, 6)), make_sequence(model, g, 1, 2, 8)]
    return [pack(a, pad_to), pack(b, pad_to)]


def hf_reference(model, batch: PackedMicroBatch, with_grad_weights: torch.Tensor | None = None):
    """Per-sequence HF forward. Returns (logprobs [T], entropy [T], think [n, H]) aligned like ForwardOutputs."""
    total = batch.num_tokens
    logprobs = torch.zeros(total)
    entropy = torch.zeros(total)
    think = torch.zeros(batch.num_sequences, model.config.text_config.hidden_size)
    merge = model.config.vision_config.spatial_merge_size ** 2
    bounds = batch.cu_seqlens.tolist()
    image_offset, patch_offset = 0, 0
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        ids = batch.input_ids[s:e]
        n_img_tokens = int((ids == IMAGE_TOKEN).sum())
        kwargs = {}
        if n_img_tokens:
            n_images, tokens = 0, 0
            while tokens < n_img_tokens:
                tokens += int(batch.image_grid_thw[image_offset + n_images].prod()) // merge
                n_images += 1
            grid = batch.image_grid_thw[image_offset:image_offset + n_images]
            n_patches = int(grid.prod(-1).sum())
            kwargs = dict(pixel_values=batch.pixel_values[patch_offset:patch_offset + n_patches], image_grid_thw=grid,
                          mm_token_type_ids=(ids == IMAGE_TOKEN).int()[None])
            image_offset += n_images
            patch_offset += n_patches
        out = model.model(input_ids=ids[None], position_ids=batch.position_ids[:, None, s:e], **kwargs)
        hidden = out.last_hidden_state[0]
        logits = model.lm_head(hidden).float()
        logp = torch.log_softmax(logits[:-1], -1)
        logprobs[s + 1:e] = logp.gather(1, ids[1:, None]).squeeze(1)
        entropy[s + 1:e] = -(logp.exp() * logp).sum(-1)
        response = batch.loss_mask[s:e]
        th = response & (batch.region_ids[s:e] == int(Region.THINK))
        chosen = th if th.any() else response
        think[i] = hidden.detach()[chosen].mean(0)
    return logprobs, entropy, think
