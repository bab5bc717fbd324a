"""A GGUF with the production model's shape and tokenizer, but random weights, for `kioskd bench`.

Qwen2.5-0.5B-Instruct cannot be downloaded on the development machines, and what its RSS
budget depends on is its shape (layers, widths, vocabulary, KV heads), not what its weights
say. This writes a qwen2-architecture GGUF of that shape: the tokenizer is Qwen's own BPE
vocabulary (151,643 ranked tokens from a `.tiktoken` file, merges rebuilt from the ranks the
way llama.cpp's converter does), the 22 special tokens of Qwen2.5, padding to 151,936 ids, a
ChatML template, and random float weights that llama.cpp then quantizes to Q4_K_M. Its answers
are noise; its memory and speed are those of the real model's shape.

`tiny_qwen2` writes a 200 KB model of the same architecture with a byte-level vocabulary,
so tests can run kioskd on the production model's architecture, tokenizer type and template.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import llama_cpp
import numpy as np

_ALIGNMENT = 32
_GGUF_VERSION = 3
# GGUF value types (gguf.h).
_UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = 4, 5, 6, 7, 8, 9
# ggml tensor types.
_F32, _F16 = 0, 1
_Tensor = tuple[str, tuple[int, ...], int]  # name, ne (innermost first), ggml type
# llama_token_type.
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5

QWEN25_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Qwen2Shape:
    layers: int
    embed: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int  # rows of the embedding matrix (the tokenizer's ids are padded up to it)
    context: int


# Qwen2.5-0.5B-Instruct's config.json (tied input and output embeddings).
QWEN25_05B = Qwen2Shape(
    layers=24, embed=896, ffn=4864, heads=14, kv_heads=2, vocab=151936, context=32768
)


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    eos_id: int
    pad_id: int


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of bytes to printable characters, as byte-level BPE stores them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Merge the token's bytes greedily by rank, using only merges ranked below max_rank."""
    parts = [bytes([b]) for b in token]
    while True:
        best: tuple[int, int] | None = None  # (rank, index)
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def qwen_vocabulary(tiktoken_file: Path, size: int) -> Vocabulary:
    """Qwen2.5's tokenizer from Qwen's `.tiktoken` ranks, padded to `size` ids."""
    ranks: dict[bytes, int] = {}
    for line in tiktoken_file.read_text().splitlines():
        encoded, number = line.split()
        ranks[base64.b64decode(encoded)] = int(number)
    to_text = _byte_to_unicode()
    text = {rank: "".join(to_text[b] for b in token) for token, rank in ranks.items()}
    merges: list[str] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = _bpe_parts(ranks, token, rank)
            if len(parts) != 2:
                raise ValueError(f"token {rank} does not split into one merge: {parts}")
            merges.append(" ".join(text[ranks[p]] for p in parts))
    return _with_specials([text[i] for i in range(len(ranks))], merges, size)


def byte_vocabulary(size: int) -> Vocabulary:
    """The 256 byte tokens, a few merges of common English pairs, Qwen2.5's special tokens."""
    to_text = _byte_to_unicode()
    tokens = [to_text[b] for b in range(256)]
    merges = []
    for pair in ("th", "he", "in", "er", "an", " t"):
        left, right = to_text[ord(pair[0])], to_text[ord(pair[1])]
        merges.append(f"{left} {right}")
        tokens.append(left + right)
    return _with_specials(tokens, merges, size)


def _with_specials(tokens: list[str], merges: list[str], size: int) -> Vocabulary:
    """Append Qwen2.5's special tokens, then padding ids up to `size`, as its GGUF has them."""
    types = [_NORMAL] * len(tokens)
    for special in QWEN25_SPECIAL_TOKENS:
        tokens.append(special)
        types.append(_CONTROL if special.startswith("<|") else _USER_DEFINED)
    for i in range(len(tokens), size):
        tokens.append(f"[PAD{i}]")
        types.append(_UNUSED)
    return Vocabulary(
        tokens,
        types,
        merges,
        eos_id=tokens.index("<|im_end|>"),
        pad_id=tokens.index("<|endoftext|>"),
    )


def _string(value: str) -> bytes:
    encoded = value.encode("utf-8")
    return struct.pack("<Q", len(encoded)) + encoded


def _value(value: Any) -> bytes:
    if isinstance(value, bool):
        return struct.pack("<I?", _BOOL, value)
    if isinstance(value, int):
        return struct.pack("<Ii" if value < 0 else "<II", _INT32 if value < 0 else _UINT32, value)
    if isinstance(value, float):
        return struct.pack("<If", _FLOAT32, value)
    if isinstance(value, str):
        return struct.pack("<I", _STRING) + _string(value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return struct.pack("<IIQ", _ARRAY, _STRING, len(value)) + b"".join(map(_string, value))
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return struct.pack("<IIQ", _ARRAY, _INT32, len(value)) + struct.pack(
            f"<{len(value)}i", *value
        )
    raise TypeError(f"no GGUF type for {type(value).__name__}")


def _pad(out: BinaryIO) -> None:
    out.write(b"\0" * (-out.tell() % _ALIGNMENT))


def write_gguf(
    path: Path,
    metadata: dict[str, Any],
    tensors: Sequence[_Tensor],
    data: Iterator[np.ndarray],
) -> None:
    """GGUF v3: metadata, then tensors given as (name, ne (innermost first), type), then data
    yielding each tensor's values in that order (so nothing holds the whole model at once)."""
    sizes = [int(np.prod(ne)) * (4 if kind == _F32 else 2) for _, ne, kind in tensors]
    with path.open("wb") as out:
        out.write(b"GGUF" + struct.pack("<IQQ", _GGUF_VERSION, len(tensors), len(metadata)))
        for key, value in metadata.items():
            out.write(_string(key) + _value(value))
        offset = 0
        for (name, ne, kind), size in zip(tensors, sizes, strict=True):
            out.write(_string(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, kind, offset))
            offset += size + (-size % _ALIGNMENT)
        _pad(out)
        for (name, _, kind), size in zip(tensors, sizes, strict=True):
            values = next(data).astype(np.float32 if kind == _F32 else np.float16)
            if values.nbytes != size:
                raise ValueError(f"{name}: {values.nbytes} bytes of data for {size}")
            out.write(values.tobytes())
            _pad(out)


def _qwen2_tensors(shape: Qwen2Shape) -> list[_Tensor]:
    head_dim = shape.embed // shape.heads
    kv = shape.kv_heads * head_dim
    tensors: list[_Tensor] = [("token_embd.weight", (shape.embed, shape.vocab), _F16)]
    for i in range(shape.layers):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (shape.embed,), _F32),
            (f"blk.{i}.attn_q.weight", (shape.embed, shape.embed), _F16),
            (f"blk.{i}.attn_q.bias", (shape.embed,), _F32),
            (f"blk.{i}.attn_k.weight", (shape.embed, kv), _F16),
            (f"blk.{i}.attn_k.bias", (kv,), _F32),
            (f"blk.{i}.attn_v.weight", (shape.embed, kv), _F16),
            (f"blk.{i}.attn_v.bias", (kv,), _F32),
            (f"blk.{i}.attn_output.weight", (shape.embed, shape.embed), _F16),
            (f"blk.{i}.ffn_norm.weight", (shape.embed,), _F32),
            (f"blk.{i}.ffn_gate.weight", (shape.embed, shape.ffn), _F16),
            (f"blk.{i}.ffn_up.weight", (shape.embed, shape.ffn), _F16),
            (f"blk.{i}.ffn_down.weight", (shape.ffn, shape.embed), _F16),
        ]
    tensors.append(("output_norm.weight", (shape.embed,), _F32))
    return tensors


def write_qwen2(
    path: Path,
    shape: Qwen2Shape,
    vocabulary: Vocabulary,
    seed: int = 0,
    *,
    template: str = CHATML_TEMPLATE,
    fixed: dict[str, np.ndarray] | None = None,
) -> None:
    """A float qwen2 GGUF of `shape` with random weights (norm weights 1).

    fixed: instead, these tensors (an `output.weight` unties the output from the embedding),
    and zeros for every other one but the norms.
    """
    metadata: dict[str, Any] = {
        "general.architecture": "qwen2",
        "general.name": "synthetic qwen2 (random weights)",
        "general.alignment": _ALIGNMENT,
        "qwen2.context_length": shape.context,
        "qwen2.embedding_length": shape.embed,
        "qwen2.feed_forward_length": shape.ffn,
        "qwen2.block_count": shape.layers,
        "qwen2.attention.head_count": shape.heads,
        "qwen2.attention.head_count_kv": shape.kv_heads,
        "qwen2.rope.freq_base": 1_000_000.0,
        "qwen2.attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": vocabulary.tokens,
        "tokenizer.ggml.token_type": vocabulary.token_types,
        "tokenizer.ggml.merges": vocabulary.merges,
        "tokenizer.ggml.eos_token_id": vocabulary.eos_id,
        "tokenizer.ggml.padding_token_id": vocabulary.pad_id,
        "tokenizer.ggml.bos_token_id": vocabulary.pad_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": template,
    }
    tensors = _qwen2_tensors(shape)
    if fixed is not None and "output.weight" in fixed:
        tensors.append(("output.weight", (shape.embed, shape.vocab), _F16))
    rng = np.random.default_rng(seed)

    def data() -> Iterator[np.ndarray]:
        for name, ne, _ in tensors:
            if fixed is not None and name in fixed:
                yield fixed[name].reshape(-1)
            elif "norm" in name:
                yield np.ones(ne, dtype=np.float32)
            elif fixed is not None:
                yield np.zeros(int(np.prod(ne)), dtype=np.float32)
            else:
                yield rng.standard_normal(int(np.prod(ne)), dtype=np.float32) * 0.02

    write_gguf(path, metadata, tensors, data())


def quantize(source: Path, target: Path, ftype: int = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source}")


def tiny_qwen2(path: Path) -> None:
    """A qwen2 model of a few hundred kilobytes: the architecture, tokenizer type and template of
    the production model, for tests."""
    shape = Qwen2Shape(layers=2, embed=64, ffn=128, heads=4, kv_heads=2, vocab=320, context=2048)
    write_qwen2(path, shape, byte_vocabulary(shape.vocab))


def scripted_qwen2(path: Path, script: str, *, template: str = CHATML_TEMPLATE) -> None:
    """A tiny qwen2 model that answers every prompt ending in a line break (as ChatML's
    generation prompt does) with `script` (distinct ASCII characters) and then <|im_end|>.

    Every layer's weights are zero, so the last hidden state is the last token's embedding: each
    token of the chain gets its own embedding axis, and the output row of its successor points
    along that axis, so greedy and sampled decoding alike write the script and end their turn.
    """
    shape = Qwen2Shape(layers=1, embed=64, ffn=128, heads=4, kv_heads=2, vocab=320, context=2048)
    vocabulary = byte_vocabulary(shape.vocab)
    chain = [ord("\n"), *(ord(c) for c in script), vocabulary.eos_id]
    if len(set(chain)) != len(chain) or len(chain) >= shape.embed:
        raise ValueError("the script must be a few distinct ASCII characters other than a newline")
    embedding = np.zeros((shape.vocab, shape.embed), dtype=np.float32)
    embedding[:, 0] = 1.0  # every other token: axis 0, which no output row points along
    output = np.zeros((shape.vocab, shape.embed), dtype=np.float32)
    for axis, (token, successor) in enumerate(itertools.pairwise(chain), start=1):
        embedding[token] = 0.0
        embedding[token, axis] = 1.0
        output[successor, axis] = 10.0
    write_qwen2(
        path,
        shape,
        vocabulary,
        template=template,
        fixed={"token_embd.weight": embedding, "output.weight": output},
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m daemon.bench.synth",
        description="write a Qwen2.5-0.5B-shaped Q4_K_M GGUF with random weights",
    )
    parser.add_argument("--tiktoken", type=Path, required=True, help="Qwen's qwen.tiktoken")
    parser.add_argument("--out", type=Path, required=True, help="the .gguf to write")
    args = parser.parse_args(argv)
    floats = args.out.with_suffix(".f16.gguf")
    try:
        write_qwen2(floats, QWEN25_05B, qwen_vocabulary(args.tiktoken, QWEN25_05B.vocab))
        quantize(floats, args.out)
    finally:
        floats.unlink(missing_ok=True)
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
