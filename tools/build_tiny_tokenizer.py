"""Build the tiny byte-level BPE tokenizer of the embedded CPU default (run once; output is committed).

    python tools/build_tiny_tokenizer.py [--vocab-size 1024] [--out care_megatron/models/assets/tiny_tokenizer]

The vocabulary is learnt from the text the embedded default actually sees: the system prompt and
chat layout, numbers, the vocabulary of the synthetic visual tasks (colours, shapes, bars,
triangles, lengths) with rationale-like sentences, and the questions and answers shipped in the
``easy_vqa`` package. Byte-level BPE still encodes any other text (as bytes), so nothing is ever unknown.

The Qwen-VL control tokens and the ``<think>``/``<answer>`` tags are single added tokens with
fixed ids at the start of the vocabulary. The output directory holds ``tokenizer.json``,
``tokenizer_config.json`` (with the chat template) and ``special_tokens_map.json``, loadable with
``transformers.AutoTokenizer.from_pretrained`` offline.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from care_megatron.data.prompting import (  # noqa: E402
    CHAT_TEMPLATE, DEFAULT_FORMAT_TAG_TOKENS, END_OF_TEXT, IM_END, QWEN_VL_SPECIAL_TOKENS, SYSTEM_PROMPT, render_chat,
)

DEFAULT_OUT = ROOT / "care_megatron" / "models" / "assets" / "tiny_tokenizer"

TASK_WORDS = """
red green blue yellow orange purple pink brown black white gray grey teal cyan magenta
circle circles square squares rectangle rectangles triangle triangles shape shapes star stars dot dots
bar bars chart charts tallest shortest highest lowest value values label labels height heights
angle angles degree degrees missing sum interior triangle's measure measures
line lines segment segments length lengths longer shorter longest shortest equal same top bottom left right
count counting how many number total there are is was the a an of in on and or which what color colour
image picture figure shown above below first second third fourth fifth sixth one two three four five six
seven eight nine ten eleven twelve yes no true false answer think step because so therefore so the answer is
compare compared than more less greater smaller larger bigger
Options: options option A. B. C. D. E. third marked longer: tallest: shorter: A, B, C, D
""".split()

RATIONALE_TEMPLATES = [
    "I count {n} {c} {s}. So the answer is {n}.",
    "There are {n} {c} {s} in the image.",
    "The tallest bar is {l} with value {n}.",
    "The angles of a triangle sum to 180 degrees, so the missing angle is 180 - {a} - {b} = {m}.",
    "Line {l} is longer than line {k}, so the answer is {l}.",
    "How many {c} {s} are there?",
    "Which bar is the tallest? Give its label and value.",
    "What is the missing angle of the triangle in degrees?",
    "Which line is longer, {l} or {k}?",
    # the compact rationales / questions of care_megatron.data.synthetic (written out, not imported,
    # so the committed vocabulary does not change when that module's wording does)
    "{c} {s}: {n}",
    "tallest: {c}",
    "longer: {c}",
    "180-{a}-{b}={m}",
    "Which bar is the tallest? Options: A. {c}, B. {c}, C. {c}",
    "Which line is longer? Options: A. {c}, B. {c}",
    "A triangle has angles of {a} and {b} degrees. What is the third angle, marked red, in degrees?",
]


def training_corpus(seed: int = 0) -> list[str]:
    """Lines of text the tokenizer learns merges from (deterministic for a seed)."""
    rng = random.Random(seed)
    lines = [SYSTEM_PROMPT, render_chat("How many red circles are there?", 1), IM_END + "\n" + END_OF_TEXT]
    lines += [" ".join(TASK_WORDS)] * 4
    lines += [str(n) for n in range(0, 400)] + [f"{n} degrees" for n in range(0, 181)]
    colours = ["red", "green", "blue", "yellow", "orange", "purple", "black", "gray", "teal", "brown"]
    shapes = ["circles", "squares", "triangles", "rectangles", "shapes"]
    labels = list("ABCDEFGH")
    for _ in range(3000):
        a, b = rng.randint(20, 80), rng.randint(20, 80)
        fill = dict(n=rng.randint(0, 12), c=rng.choice(colours), s=rng.choice(shapes), l=rng.choice(labels),
                    k=rng.choice(labels), a=a, b=b, m=180 - a - b)
        body = rng.choice(RATIONALE_TEMPLATES).format(**fill)
        lines.append(f"<think>{body}</think><answer>{fill['n']}</answer>")
        lines.append(body)
    try:
        import easy_vqa

        questions, answers, _ = easy_vqa.get_train_questions()
        lines += questions + answers + easy_vqa.get_answers()
    except ImportError:
        print("easy_vqa not installed: its questions are not in the corpus", file=sys.stderr)
    return lines


def build(out: Path, vocab_size: int, seed: int = 0) -> int:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    added = list(QWEN_VL_SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(DEFAULT_FORMAT_TAG_TOKENS),
        min_frequency=1,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in added],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(seed), trainer=trainer)
    # The reasoning tags are added tokens but not "special": decoding with skip_special_tokens keeps
    # them, as in Qwen3's tokenizer, because the reward parser needs them in the text.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in DEFAULT_FORMAT_TAG_TOKENS])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": END_OF_TEXT,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
        "additional_special_tokens": [t for t in added if t not in (IM_END, END_OF_TEXT)],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": IM_END, "pad_token": END_OF_TEXT,
         "additional_special_tokens": config["additional_special_tokens"]}, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return tokenizer.get_vocab_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    size = build(args.out, args.vocab_size, args.seed)
    print(f"wrote {args.out} ({size} tokens)")


if __name__ == "__main__":
    main()
