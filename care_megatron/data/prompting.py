"""Prompts for Qwen-VL models: system prompt, chat template with image placeholders, processors.

The prompt of every rollout is built here, once, so that the rollout engines (HF ``generate``,
SGLang), the training backends and the SFT loop all see the same token ids:

* :data:`SYSTEM_PROMPT` asks for ``<think>...</think><answer>...</answer>`` (spec section 2, the
  output format the format reward checks); :func:`system_prompt_for` writes the same instruction for
  the run's tags (``data.think_tag: reasoning``: ``<reasoning>...</reasoning><answer>...</answer>``).
* :func:`render_chat` writes the Qwen chat layout (``<|im_start|>role\\n...<|im_end|>\\n``) with one
  ``<|vision_start|><|image_pad|><|vision_end|>`` block per image, in the order the images are given.
* :func:`build_prompt` runs the image processor (``transformers.Qwen2VLImageProcessorPil``, the PIL
  backend, because torchvision does not load beside the CPU torch) and expands each image's single
  ``<|image_pad|>`` into ``grid_t * grid_h * grid_w / merge_size**2`` copies: exactly the number of
  rows the vision tower emits for that image, which is what the HF model checks when it scatters
  image features into the text embeddings.
* :func:`build_sequence` appends a response to a prompt and builds the per-token tensors of
  :class:`care_megatron.data.batch.Sequence` (loss mask on response tokens, region ids).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence as SequenceType

import torch

from care_megatron.data.batch import Sequence
from care_megatron.rewards.parsing import DEFAULT_TAGS, TagConfig
from care_megatron.rewards.regions import Region


def system_prompt_for(tags: TagConfig = DEFAULT_TAGS) -> str:
    """The package's instruction asking for ``tags``' layout (rationale span, then answer span)."""
    return (
        "You are a careful visual reasoner. Look at the image and think about the question step by step "
        f"inside {tags.think_open} {tags.think_close} tags, then give only the final answer inside "
        f"{tags.answer_open} {tags.answer_close} tags, for example "
        f"{tags.think_open}reasoning here{tags.think_close}{tags.answer_open}final answer here{tags.answer_close}."
    )


SYSTEM_PROMPT = system_prompt_for(DEFAULT_TAGS)
"""System prompt of every RL / SFT / evaluation prompt with the default tags: asks for the
``<think>``/``<answer>`` layout."""


def resolve_system_prompt(value: str | None, tags: TagConfig = DEFAULT_TAGS) -> str | None:
    """``data.system_prompt`` as :func:`render_chat` takes it: None -> the package's instruction for
    ``tags`` (``data.think_tag``; :data:`SYSTEM_PROMPT` for the default tags), "" -> no system turn."""
    if value is None:
        return system_prompt_for(tags)
    return value or None

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

QWEN_VL_SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
"""Control tokens of the Qwen-VL chat layout (each one token in every supported tokenizer)."""
DEFAULT_FORMAT_TAG_TOKENS = DEFAULT_TAGS.all_tags
"""The default output-format tags ``<think>``, ``</think>``, ``<answer>``, ``</answer>``
(:data:`care_megatron.rewards.parsing.DEFAULT_TAGS`): single tokens in the tiny tokenizer, plain text
pieces in Qwen2.5's vocabulary. ``<reasoning>`` (``data.think_tag: reasoning``) is plain text in both."""

IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
"""What one image looks like in the unexpanded prompt text."""

# Jinja rendering of exactly what render_chat writes; stored in the tiny tokenizer's config so that
# ``tokenizer.apply_chat_template`` agrees with render_chat (tests check the two match).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

ARCH_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    # Values of the released checkpoints' preprocessor_config.json (Qwen2.5-VL: 14-pixel patches, CLIP
    # mean / std, 3136..12845056 pixels; Qwen3-VL: 16-pixel patches, mean / std 0.5, 65536..16777216
    # pixels). transformers maps both to Qwen2VLImageProcessor(Pil), whose class default is patch 14.
    "qwen2_5_vl": dict(patch_size=14, temporal_patch_size=2, merge_size=2,
                       image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                       min_pixels=56 * 56, max_pixels=28 * 28 * 16384),
    "qwen3_vl": dict(patch_size=16, temporal_patch_size=2, merge_size=2,
                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                     min_pixels=256 * 256, max_pixels=16384 * 32 * 32),
}
"""Image-processor settings per architecture family (the released models' preprocessor configs)."""


def build_image_processor(arch: str, min_pixels: int | None = None, max_pixels: int | None = None,
                          patch_size: int | None = None, merge_size: int | None = None,
                          temporal_patch_size: int | None = None, image_mean: list[float] | None = None,
                          image_std: list[float] | None = None):
    """A ``transformers.Qwen2VLImageProcessorPil`` configured for ``arch`` (``qwen2_5_vl`` | ``qwen3_vl``).

    ``min_pixels`` / ``max_pixels`` bound the resized area (the processor's ``smart_resize`` keeps
    both sides multiples of ``patch_size * merge_size``); None keeps the architecture's default.
    The patch / merge sizes must equal the vision tower's; :func:`care_megatron.models.build_model_and_processor`
    passes them from the model config (and a checkpoint directory's ``preprocessor_config.json`` values).
    """
    from transformers import Qwen2VLImageProcessorPil

    if arch not in ARCH_PROCESSOR_DEFAULTS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCH_PROCESSOR_DEFAULTS)}")
    settings = dict(ARCH_PROCESSOR_DEFAULTS[arch])
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels), ("patch_size", patch_size),
                        ("merge_size", merge_size), ("temporal_patch_size", temporal_patch_size)):
        if value is not None:
            settings[name] = int(value)
    for name, value in (("image_mean", image_mean), ("image_std", image_std)):
        if value is not None:
            settings[name] = [float(v) for v in value]
    if settings["min_pixels"] > settings["max_pixels"]:
        raise ValueError(f"min_pixels {settings['min_pixels']} > max_pixels {settings['max_pixels']}")
    return Qwen2VLImageProcessorPil(**settings)


def render_chat(question: str, num_images: int, system_prompt: str | None = SYSTEM_PROMPT,
                add_generation_prompt: bool = True, images_first: bool = True) -> str:
    """Prompt text in the Qwen chat layout, one unexpanded image placeholder per image.

    ``images_first`` puts the image blocks before the question (the Qwen-VL convention for a single
    user turn); False puts them after. With ``add_generation_prompt`` the text ends with
    ``<|im_start|>assistant\\n``, where the response starts.
    """
    parts = []
    if system_prompt is not None:
        parts.append(f"{IM_START}system\n{system_prompt}{IM_END}\n")
    images = IMAGE_PLACEHOLDER * num_images
    user = images + question if images_first else question + images
    parts.append(f"{IM_START}user\n{user}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def chat_messages(question: str, num_images: int, system_prompt: str | None = SYSTEM_PROMPT,
                  images_first: bool = True) -> list[dict]:
    """The same prompt as :func:`render_chat`, as HF chat messages (for ``apply_chat_template``)."""
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    image_parts = [{"type": "image"} for _ in range(num_images)]
    text_part = [{"type": "text", "text": question}]
    messages.append({"role": "user", "content": image_parts + text_part if images_first else text_part + image_parts})
    return messages


@dataclass
class PromptTokenIds:
    """The token ids a prompt relies on, resolved once per tokenizer."""

    image_token_id: int
    """``<|image_pad|>``: one per merged vision-tower output row."""
    vision_start_token_id: int
    """``<|vision_start|>``: precedes each image block."""
    vision_end_token_id: int
    """``<|vision_end|>``: follows each image block."""
    im_end_token_id: int
    """``<|im_end|>``: ends a turn; the end-of-response token of generation."""
    pad_token_id: int
    """Padding token (``<|endoftext|>`` as in Qwen)."""

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "PromptTokenIds":
        """Resolve the ids; ValueError if a control token is not a single token of ``tokenizer``."""
        def one(token: str) -> int:
            ids = tokenizer.convert_tokens_to_ids(token)
            if ids is None or ids == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(ids) != token:
                raise ValueError(f"tokenizer has no single token for {token!r}; it cannot serve Qwen-VL prompts")
            return int(ids)

        return cls(image_token_id=one(IMAGE_PAD), vision_start_token_id=one(VISION_START),
                   vision_end_token_id=one(VISION_END), im_end_token_id=one(IM_END), pad_token_id=one(END_OF_TEXT))


GENERATION_FORBIDDEN_TOKENS = (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, IM_START)
"""Tokens a response must never contain: an ``<|image_pad|>`` in a response breaks the image-token count
the model and :func:`care_megatron.data.packing.mrope_position_ids` check (a random tiny model samples
one within a few rollouts). Rollout engines suppress them (HF ``generate(suppress_tokens=...)``)."""


def generation_suppressed_token_ids(tokenizer) -> list[int]:
    """Ids of :data:`GENERATION_FORBIDDEN_TOKENS` in ``tokenizer``, for ``generate(suppress_tokens=...)``."""
    ids = []
    for token in GENERATION_FORBIDDEN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.append(int(token_id))
    return ids


@dataclass
class PromptInputs:
    """One tokenised prompt with its processed images.

    Shapes: ``pixel_values`` FloatTensor[P, C] with P = sum over images of ``t * h * w`` patches and
    C = channels * temporal_patch_size * patch_size**2; ``image_grid_thw`` LongTensor[n_images, 3].
    """

    prompt_ids: list[int]
    """Token ids of the prompt, each image's ``<|image_pad|>`` already expanded to its merged-token count."""
    prompt_text: str
    """Prompt text with ONE ``<|image_pad|>`` per image (what SGLang / HF processors take with image data)."""
    pixel_values: torch.Tensor | None
    """Flattened patches of all images in order, or None for a text-only prompt."""
    image_grid_thw: torch.Tensor | None
    """Patch grid ``[t, h, w]`` of each image (before the 2x2 merge), or None for a text-only prompt."""
    images: list = field(default_factory=list)
    """The PIL images as given (RGB), for engines that take raw images (SGLang)."""
    merge_size: int = 2
    """Spatial merge of the vision tower (``merge_size**2`` patches become one token)."""

    @property
    def num_image_tokens(self) -> int:
        """Number of ``<|image_pad|>`` tokens in ``prompt_ids`` (the vision tower's merged output rows)."""
        return 0 if self.image_grid_thw is None else int(self.image_grid_thw.prod(-1).sum()) // self.merge_size**2

    def __len__(self) -> int:
        return len(self.prompt_ids)


def _as_rgb(image):
    from PIL import Image

    if isinstance(image, (str, bytes)) or hasattr(image, "read"):
        import io

        image = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"images must be PIL images, paths or bytes, got {type(image).__name__}")
    return image.convert("RGB")


def build_prompt(question: str, images: Iterable, tokenizer, image_processor,
                 system_prompt: str | None = SYSTEM_PROMPT, images_first: bool = True,
                 image_pipeline=None) -> PromptInputs:
    """Tokenise one prompt and process its images for a Qwen-VL model.

    ``images``: PIL images, file paths or encoded bytes (in placeholder order). ``image_processor``:
    from :func:`build_image_processor` (its patch / merge sizes decide the token counts). Returns
    :class:`PromptInputs` whose ``prompt_ids`` hold ``grid_t * grid_h * grid_w / merge_size**2``
    ``<|image_pad|>`` tokens per image, matching the rows the vision tower emits (the HF model
    raises when the two differ). ``image_pipeline`` (from ``data.image_backend``, see
    :func:`care_megatron.data.images.run_image_pipeline`): decodes and resizes the images to the
    processor's rule first (DALI), so the processor's own resize is the identity; None = the processor does it.
    """
    if image_pipeline is not None:
        from PIL import Image

        images = [Image.fromarray(array) for array in image_pipeline(list(images))]
    images = [_as_rgb(im) for im in images]
    text = render_chat(question, len(images), system_prompt=system_prompt, images_first=images_first)
    merge_sq = int(image_processor.merge_size) ** 2
    pixel_values = grid_thw = None
    expanded = text
    if images:
        processed = image_processor(images=images, return_tensors="pt")
        pixel_values = processed["pixel_values"]
        grid_thw = processed["image_grid_thw"].long()
        counts = (grid_thw.prod(-1) // merge_sq).tolist()
        # Expand placeholder by placeholder, left to right, so image i gets counts[i] pads.
        pieces = text.split(IMAGE_PAD)
        if len(pieces) != len(images) + 1:
            raise ValueError(f"the question text must not contain {IMAGE_PAD!r} itself")
        expanded = pieces[0] + "".join(IMAGE_PAD * n + rest for n, rest in zip(counts, pieces[1:]))
    ids = tokenizer(expanded, add_special_tokens=False)["input_ids"]
    prompt = PromptInputs(prompt_ids=list(ids), prompt_text=text, pixel_values=pixel_values,
                          image_grid_thw=grid_thw, images=images, merge_size=int(image_processor.merge_size))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    if sum(1 for t in prompt.prompt_ids if t == image_token_id) != prompt.num_image_tokens:
        raise ValueError("tokenizer split <|image_pad|>: it is not a single added token of this tokenizer")
    return prompt


def build_sequence(prompt: PromptInputs, response_ids: SequenceType[int] | torch.Tensor,
                   response_region_ids: SequenceType[int] | torch.Tensor | None = None,
                   token_fields: dict[str, torch.Tensor] | None = None, sequence_id: int = -1) -> Sequence:
    """Prompt + response as a :class:`care_megatron.data.batch.Sequence` (per-token tensors aligned with ids).

    ``response_region_ids``: one :class:`~care_megatron.rewards.regions.Region` code per response
    token (from the response parser); None marks every response token OTHER. Prompt tokens are
    OTHER and have ``loss_mask`` False; response tokens have ``loss_mask`` True. ``token_fields``
    may hold per-token tensors of length L (whole sequence) or of the response length (these are
    left-padded with zeros over the prompt so they align with ``input_ids``). ``position_ids`` is
    left None: packing computes M-RoPE positions from the ids and the image grids.
    """
    response = torch.as_tensor(list(response_ids) if not torch.is_tensor(response_ids) else response_ids,
                               dtype=torch.long).reshape(-1)
    prompt_len, response_len = len(prompt.prompt_ids), int(response.numel())
    input_ids = torch.cat([torch.tensor(prompt.prompt_ids, dtype=torch.long), response])
    loss_mask = torch.zeros(prompt_len + response_len, dtype=torch.bool)
    loss_mask[prompt_len:] = True
    region_ids = torch.full((prompt_len + response_len,), int(Region.OTHER), dtype=torch.long)
    if response_region_ids is not None:
        regions = torch.as_tensor(response_region_ids, dtype=torch.long).reshape(-1)
        if regions.numel() != response_len:
            raise ValueError(f"response_region_ids has {regions.numel()} entries for {response_len} response tokens")
        valid = {int(r) for r in Region}
        bad = set(regions.unique().tolist()) - valid
        if bad:
            raise ValueError(f"response_region_ids holds codes {sorted(bad)} outside Region {sorted(valid)}")
        region_ids[prompt_len:] = regions
    fields = {}
    for name, values in (token_fields or {}).items():
        values = torch.as_tensor(values).reshape(-1)
        if values.numel() == response_len and response_len != prompt_len + response_len:
            values = torch.cat([values.new_zeros(prompt_len), values])
        if values.numel() != prompt_len + response_len:
            raise ValueError(f"token_fields[{name!r}] has {values.numel()} entries; expected "
                             f"{response_len} (response) or {prompt_len + response_len} (sequence)")
        fields[name] = values
    return Sequence(input_ids=input_ids, loss_mask=loss_mask, region_ids=region_ids, position_ids=None,
                    pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                    token_fields=fields, sequence_id=sequence_id)
