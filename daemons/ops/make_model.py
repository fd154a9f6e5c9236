"""Write a small, deterministic, random-weight Llama-shaped model that needs no hub.

The tokenizer is a byte-level BPE trained here on generated text; the weights
come from a fixed seed, so two runs write the same files. The default shape
(4 layers, hidden 256, 8192+ positions) is big enough that prefill costs
visibly more than loading KV, and the seed's prompt ("Hello, how are you?" x
1000, ~6,000 tokens) fits.

transformers, tokenizers and torch are imported only here (they come with vLLM).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_WORDS = (
    "hello how are you today fine thanks the a of and to in is it that for on with as was at by "
    "this be from or have an they which one you were her all she there would their we him been "
    "has when who will more no if out so said what up its about into than them can only other new "
    "some could time these two may then do first any my now such like our over man me even most "
    "made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men "
    "work long get here between both life being under never day same another know while last might "
    "us great old year off come since against go came right used take three cache prefill decode "
    "token server engine model request memory chunk layer vector serve latency disaggregated"
).split()
_SEED_SENTENCE = "Hello, how are you?"


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 16384
    initializer_range: float = 0.1
    rope_theta: float = 10000.0
    seed: int = 0


SHAPES = {
    "tiny": ModelShape(),
    # Mistral-7B-Instruct-v0.2's shape, for GPU runs with load_format "dummy"
    # (random weights made by vLLM on the GPU; only config and tokenizer are written).
    "mistral-7b": ModelShape(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, max_position_embeddings=32768, initializer_range=0.02, rope_theta=1_000_000.0,
    ),
    # Llama-3.2-1B's shape (GQA 32/8, 16 layers; 32 KiB of KV per token in bf16): four engines share one GPU.
    "llama-3.2-1b": ModelShape(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, max_position_embeddings=131072, initializer_range=0.02, rope_theta=500_000.0,
    ),
}


def _corpus(rng: random.Random, lines: int = 20000) -> list[str]:
    out = []
    for i in range(lines):
        n = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ","])
        out.append(sentence if i % 5 else f"{_SEED_SENTENCE} {sentence}")
    return out


def _train_tokenizer(vocab_size: int, seed: int) -> Any:  # a PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(random.Random(seed)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )


def make_model(out_dir: Path, shape: ModelShape = ModelShape(), *, weights: bool = True) -> Path:
    """Write the model to ``out_dir`` (created); returns it. Same shape, same files.

    ``weights=False`` writes only the config and tokenizer (for ``load_format: dummy``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(min(shape.vocab_size, 4096), shape.seed)
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), shape.vocab_size if not weights else 0),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        rope_theta=shape.rope_theta,
        max_position_embeddings=shape.max_position_embeddings,
        initializer_range=shape.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    if weights:
        torch.manual_seed(shape.seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
        model.save_pretrained(out_dir, safe_serialization=True)
    else:
        config.torch_dtype = "bfloat16"
        config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for f in out_dir.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; the service user must read it
    # The generation defaults of a random model are meaningless; don't let them
    # override the request's sampling parameters.
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}) + "\n"
    )
    log.info(
        "wrote %s: %d layers, hidden %d, vocab %d, %d positions",
        out_dir, shape.num_layers, shape.hidden_size, config.vocab_size, shape.max_position_embeddings,
    )
    return out_dir
