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
