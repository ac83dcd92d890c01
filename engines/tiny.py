"""A tiny random-weight Llama, built offline, so vLLM can run for real in tests and demos.

There is no model hub here, so the model is made from nothing: a byte-level BPE tokenizer
trained on a small built-in corpus (every byte is in its alphabet, so any text, JSON
included, can be tokenized) and a 2-layer Llama with random weights. Its output is
gibberish, but it goes through vLLM exactly as a real model does: chat templating,
sampling, logprobs, stop strings, structured outputs, tool-call formatting.

``conduit models build-tiny [--path P]`` calls :func:`build_tiny_llama` with
:func:`default_model_dir` unless given a path.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

#: Files whose presence means a build finished (it is renamed into place at the end).
_REQUIRED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"

#: ChatML-style template in the Hermes tool-calling format (tools listed in the system turn,
#: calls as ``<tool_call>{json}</tool_call>``), so vLLM's ``hermes`` tool parser fits it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|im_start|>system\\nYou may call these tools:\\n<tools>\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}{{ '</tools><|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'tool' %}{{ '<tool_response>\\n' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'tool' %}{{ '\\n</tool_response>' }}{% endif %}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{% else %}{{ call['function']['arguments'] | tojson }}{% endif %}{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How can I help you today?",
    "Conduit is an OpenAI-compatible gateway that serves chat completions and images.",
    "Please answer in JSON with the fields name, age and city.",
    "The weather in Paris is sunny, 21 degrees; tomorrow it may rain.",
    "You are a helpful assistant. Keep your answers short and accurate.",
    "What is 12 + 30? The answer is 42.",
    "Call the function get_weather with the argument location set to Berlin.",
    "Streams, queues and workers: Redis carries every job from the gateway to an engine.",
]
_WORDS = ("name", "age", "city", "location", "unit", "celsius", "items", "id", "value", "true",
          "false", "null", "type", "object", "string", "number", "array", "properties", "required",
          "Alice", "Bob", "Berlin", "Paris", "Tokyo", "weather", "temperature", "result", "ok")


def default_model_dir() -> Path:
    """Where ``conduit models build-tiny`` puts the model unless told otherwise."""
    root = os.environ.get("CONDUIT_CACHE_DIR") or Path.home() / ".cache" / "conduit"
    return Path(root) / "models" / "tiny-llama"


def _corpus(seed: int) -> list[str]:
    """English sentences plus generated JSON-ish lines, deterministic for a seed."""
    rng = random.Random(seed)
    lines = list(_SENTENCES)
    for _ in range(400):
        keys = rng.sample(_WORDS, 3)
        values = [rng.choice((f'"{rng.choice(_WORDS)}"', str(rng.randint(0, 9999)),
                              f"{rng.random():.3f}", "true", "null", f"[{rng.randint(0, 99)}, {rng.randint(0, 99)}]"))
                  for _ in keys]
        lines.append("{" + ", ".join(f'"{k}": {v}' for k, v in zip(keys, values)) + "}")
        lines.append(" ".join(rng.choice(_SENTENCES).split()[: rng.randint(3, 12)]))
    return lines


def _train_tokenizer(seed: int, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Llama-style BOS and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, IM_START, IM_END]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The full 256-byte alphabet makes every string encodable (no unknown token needed).
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Llama-style: plain encodes (completions) get BOS; chat prompts carry it in the template.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                      additional_special_tokens=[IM_START, IM_END], model_max_length=2048)
    # Hermes' markers are ordinary added tokens (as in Qwen): kept in decoded text.
    wrapped.add_tokens([TOOL_CALL, TOOL_CALL_END])
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED)


def build_tiny_llama(path: Path, *, seed: int = 0, vocab_size: int = 1536) -> Path:
    """Write a tiny random Llama (HF format, safetensors) to ``path`` and return ``path``.

    About 600K parameters in bfloat16; ``vocab_size`` is an upper bound (the corpus yields
    ~1,200 tokens). Use ``tool_call_parser="hermes"`` with it: the template speaks Hermes.

    Idempotent: a directory that already holds a complete model is returned untouched.
    The model is built in a sibling temporary directory and renamed into place, so
    concurrent builders (parallel tests) never see half a model.
    """
    path = Path(path)
    if _is_complete(path):
        return path
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model is meant to be shared
    try:
        tokenizer = _train_tokenizer(seed, vocab_size)
        tokenizer.save_pretrained(tmp)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD, IM_END)}
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
            # vLLM's CPU attention supports head sizes 32, 64, 80, ... (16 fails).
            head_dim=32, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False,
            bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], dtype="bfloat16",
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # what vLLM on CPU runs anyway
        model.save_pretrained(tmp, safe_serialization=True)
        # Chat turns end with <|im_end|>; either token stops generation.
        GenerationConfig(bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[IM_END]],
                         pad_token_id=ids[PAD]).save_pretrained(tmp)
        if path.exists() and not _is_complete(path):
            shutil.rmtree(path, ignore_errors=True)  # an incomplete leftover, not a builder's
        try:
            os.replace(tmp, path)
        except OSError:
            if not _is_complete(path):  # else another builder won the race: use its model
                raise
        return path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """``build-tiny [--path P] [--seed N]``: build the tiny model and print its path."""
    import argparse

    parser = argparse.ArgumentParser(prog="conduit models build-tiny",
                                     description="Build the tiny random Llama (offline) and print its path.")
    parser.add_argument("--path", type=Path, default=None,
                        help="target directory (default: $CONDUIT_CACHE_DIR or ~/.cache/conduit, + models/tiny-llama)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_llama(args.path or default_model_dir(), seed=args.seed))


# ---- the tiny Stable Diffusion pipeline ---------------------------------------------------

#: Files whose presence means a pipeline build finished.
# (transformers 5 saves a CLIPTokenizer as tokenizer.json, without vocab.json/merges.txt.)
_SD_REQUIRED = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json")

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def default_sd_dir() -> Path:
    """Where ``conduit models build-tiny`` puts the tiny Stable Diffusion pipeline."""
    return default_model_dir().parent / "tiny-sd"


def _byte_symbols() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2's, CLIP's) writes bytes as."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = 0
    symbols = {}
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _train_clip_tokenizer(out: Path, seed: int, merges: int) -> int:
    """CLIP's BPE files (``vocab.json``, ``merges.txt``) trained offline; returns the vocabulary size.

    CLIP's tokenizer lower-cases, splits words, maps bytes to printable characters and marks
    a word's last symbol with ``</w>``; every byte symbol is in the vocabulary in both forms,
    so any prompt tokenizes without an unknown token.
    """
    import json
    import re
    from collections import Counter

    byte_chars = _byte_symbols()
    vocab: list[str] = byte_chars + [c + "</w>" for c in byte_chars]
    text = " ".join(_corpus(seed)).lower()
    words = Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text))
    # Each word as a tuple of symbols, the last one marked: what CLIP's bpe() starts from.
    split = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    learned: list[tuple[str, str]] = []
    for _ in range(merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, symbols in split.items():
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        learned.append((a, b))
        vocab.append(a + b)
        for w, symbols in split.items():
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            split[w] = merged
    vocab += [CLIP_BOS, CLIP_EOS]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in learned))
    return len(vocab)


def build_tiny_sd(path: Path, *, seed: int = 0, merges: int = 300) -> Path:
    """Write a tiny random-weight Stable Diffusion pipeline (diffusers format) to ``path``.

    The architecture of SD 1.x at toy width: a 2-block UNet with cross-attention, a 4-block
    VAE (8x down-sampling, as SD's), a 2-layer CLIP text encoder and an offline CLIP
    tokenizer, with an Euler scheduler. Its images are noise, but it loads through
    ``AutoPipelineForText2Image.from_pretrained`` and runs every step a real model runs:
    64x64 in 4 steps takes a few milliseconds per image on a CPU. Default size 64x64.

    Idempotent and safe against concurrent builders, like :func:`build_tiny_llama`.
    """
    path = Path(path)
    if all((path / name).is_file() for name in _SD_REQUIRED):
        return path
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    tmp.chmod(0o755)
    try:
        vocab_size = _train_clip_tokenizer(tmp / "tok-src", seed, merges)
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tok-src", model_max_length=77)
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, sample_size=64)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id, projection_dim=32))
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(tmp / "pipe", safe_serialization=True)
        (tmp / "pipe").chmod(0o755)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)  # an incomplete leftover
        try:
            os.replace(tmp / "pipe", path)
        except OSError:
            if not all((path / name).is_file() for name in _SD_REQUIRED):
                raise
        return path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
