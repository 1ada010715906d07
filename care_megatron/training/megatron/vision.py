"""Vision tower of Qwen2.5-VL on the first pipeline stage, replicated across tensor parallelism.

The tower is transformers' own module (``Qwen2_5_VisionTransformerPretrainedModel``), so its
numerics are the Hugging Face reference by construction. Every TP rank holds a full copy, runs it
on the same pixels and receives the same full feature gradient (the first decoder layer's
column-parallel input all-reduces it; under sequence parallelism the scatter's backward all-gathers
it), so its gradients are already equal on every TP rank and are not reduced over TP, as Megatron
treats its own replicated norms without sequence parallelism. The distributed tests check every TP
rank's copy against transformers. (Non-deterministic GPU kernels in the tower's backward could let the
copies drift apart by rounding over many steps; rank 0's copy is the one exported.)

Features are scattered into the ``<|image_pad|>`` positions of the token embeddings
(:func:`scatter_image_features`), and the result is passed to ``GPTModel`` as ``decoder_input``.
"""
from __future__ import annotations

import torch
from torch import nn


class VisionTower(nn.Module):
    """Wraps the HF vision tower. Parameter names: ``vision_model.<HF name under model.visual>``.

    ``qwen2_5_vl``: ``Qwen2_5_VisionTransformerPretrainedModel``; ``qwen3_vl``: ``Qwen3VLVisionModel``,
    whose DeepStack taps (features of intermediate vision blocks, one per early decoder layer) are
    returned beside the merged features.
    """

    def __init__(self, hf_vision_config, arch: str = "qwen2_5_vl"):
        super().__init__()
        if arch == "qwen2_5_vl":
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

            self.vision_model = Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_vision_config)
        elif arch == "qwen3_vl":
            from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

            self.vision_model = Qwen3VLVisionModel._from_config(hf_vision_config)
        else:
            raise ValueError(f"config field 'model.arch': unknown vision tower {arch!r}; valid: qwen2_5_vl, qwen3_vl")
        self.spatial_merge_size = hf_vision_config.spatial_merge_size

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        """pixel_values [P, C], image_grid_thw [n_images, 3] -> (merged features [P / merge^2, D_lm],
        DeepStack features: list of [P / merge^2, D_lm], empty for Qwen2.5-VL)."""
        dtype = next(self.vision_model.parameters()).dtype
        out = self.vision_model(pixel_values.to(dtype), grid_thw=image_grid_thw)
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        deepstack = list(getattr(out, "deepstack_features", None) or [])
        return features, deepstack


def scatter_image_features(embeddings: torch.Tensor, input_ids: torch.Tensor, image_features: torch.Tensor,
                           image_token_id: int) -> torch.Tensor:
    """Replace the embedding rows of image-pad tokens by the vision features, in order.

    embeddings [T, D], input_ids [T], image_features [N_pad, D] -> [T, D] (out of place, differentiable
    in both inputs). Raises ValueError when the counts differ (a truncated image would misalign).
    """
    mask = input_ids == image_token_id
    count = int(mask.sum())
    if count != image_features.shape[0]:
        raise ValueError(f"{count} <|image_pad|> tokens but {image_features.shape[0]} image features; "
                         "an image was truncated or image_grid_thw does not match the prompt")
    index = mask.nonzero(as_tuple=True)[0]
    return embeddings.index_put((index,), image_features.to(embeddings.dtype))
