"""care_megatron.models: model registry (tiny random Qwen-VL configs, local HF checkpoints), tokenizers, processors.

Public API::

    build_model_and_processor(model_config, device="cpu", min_pixels=None, max_pixels=None)
        -> (model, tokenizer, image_processor)
    build_hf_config(name, tokenizer="tiny") -> transformers config
    load_tokenizer(name="tiny" | "qwen" | "qwen3" | <dir>) -> tokenizer
    build_image_processor(arch, min_pixels=None, max_pixels=None, ...) -> Qwen2VLImageProcessorPil
"""
from care_megatron.data.prompting import build_image_processor
from care_megatron.models.registry import (
    MODEL_REGISTRY, arch_of, build_hf_config, build_model_and_processor, count_parameters, model_class,
)
from care_megatron.models.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

__all__ = [
    "MODEL_REGISTRY", "TINY_TOKENIZER_DIR", "arch_of", "build_hf_config", "build_image_processor",
    "build_model_and_processor", "count_parameters", "load_tokenizer", "model_class",
]
