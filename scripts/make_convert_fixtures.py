"""Fixtures for the converter's compatibility with llama.cpp, in both directions.

Run locally (needs llama-cpp-python built from source and its source tree, which holds
`convert_hf_to_gguf.py`); CI only reads what this writes:

    python scripts/make_convert_fixtures.py --llama-cpp /path/to/llama_cpp_python-X/vendor/llama.cpp

For each family, under tests/fixtures/convert/<family>/:
  * a tiny random model as a Hugging Face folder (config.json, model.safetensors in bfloat16
    so it stays small, a tiny tokenizer);
  * `llama.cpp.gguf`: that folder converted by llama.cpp's own `convert_hf_to_gguf.py`
    (--outtype bf16: lossless. From float16 weights llama.cpp would add Gemma's +1 to the
    norms in float16, rounding them; from bfloat16 it adds in float32, exactly as we do);
  * `expected.npz`: `ids`; for each of our
    converter's types T in F32 and Q8_0: `lcpp_logits_T`, llama.cpp's logits on the file
    our converter writes, and `digest_T`, the sha256 of that file's tensor data, so a test
    knows the logits belong to the file it converts.

llama.cpp identifies a byte-level BPE pre-tokenizer by hashing a probe text's token ids,
which a tiny trained tokenizer cannot match; its converter is run with that lookup answering
"qwen2" (the tiny tokenizer's regex), the name diptych's converter derives from the regex.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from llama_cpp_model import open_llama

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "convert"
sys.path.insert(0, str(ROOT))

from tests.tiny_models import FAMILIES, logits, save_hf_folder, tiny_hf_model  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
             tie_word_embeddings=True)
MLA = dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2,
           kv_lora_rank=16, q_lora_rank=16, vocab_size=300, tie_word_embeddings=True)
# family -> (config overrides, tokenizer kind). A byte-level BPE vocabulary needs >= 300
# tokens; llama.cpp's converter reads qwen3moe and deepseek tokenizers only as BPE.
SPECS = {
    "llama": (SMALL, "spm"),
    "qwen2": (SMALL, "spm"),
    "qwen3": (dict(SMALL, head_dim=8), "spm"),
    # llama.cpp's `llama` arch has no sliding window: keep the window past the sequence
    "mistral": (dict(SMALL, head_dim=8, sliding_window=32), "spm"),
    # six layers: llama.cpp's converter writes no layer pattern, and llama.cpp then
    # assumes five sliding layers and one global, which is transformers' default too
    "gemma3": (dict(SMALL, intermediate_size=32, head_dim=8, query_pre_attn_scalar=8,
                    num_hidden_layers=6, layer_types=None), "spm"),
    "mixtral": (dict(SMALL, intermediate_size=32), "spm"),
    "qwen3moe": (dict(SMALL, head_dim=8, moe_intermediate_size=32, vocab_size=300), "bpe"),
    # llama.cpp reads a DeepSeek-V2 without q_lora_rank only at V2-Lite's layer count
    "deepseek_v2": (MLA, "bpe"),
    "deepseek_v3": (MLA, "bpe"),
}
SEQ = 16
TYPES = ("F32", "Q8_0")


def digest(path: Path) -> str:
    """sha256 of a GGUF file's tensor data (the metadata may hold a file name)."""
    from diptych.quant.gguf_file import GGUFFile

    with GGUFFile(path) as f:
        start = f.data_offset
    return hashlib.sha256(path.read_bytes()[start:]).hexdigest()


def llama_cpp_convert(lcpp: Path, folder: Path, out: Path) -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[1:]\n"
        "import conversion.base as b\n"
        "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
        "import convert_hf_to_gguf as c; sys.argv[0] = c.__file__; c.main()\n")
    subprocess.run([sys.executable, "-c", code, str(lcpp), str(folder), "--outfile", str(out),
                    "--outtype", "bf16"], check=True, capture_output=True, cwd=lcpp)


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    # an F32 KV cache (llama.cpp's default is F16), so F32 files compare at fp32 accuracy
    llm = open_llama(path, n_ctx=64, n_batch=64, n_threads=2, logits_all=True,
                     type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                     verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-cpp", type=Path, required=True,
                    help="llama.cpp source tree (with convert_hf_to_gguf.py)")
    ap.add_argument("families", nargs="*", default=list(FAMILIES))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from diptych.sources.convert import convert

    for family in args.families:
        overrides, tok = SPECS[family]
        folder = OUT / family
        shutil.rmtree(folder, ignore_errors=True)
        save_hf_folder(tiny_hf_model(family, seed=100, **overrides), folder, tok, dtype="bfloat16")
        (folder / "generation_config.json").unlink(missing_ok=True)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
        vocab = hf.config.vocab_size
        ids = [int(i) for i in np.random.default_rng(5).integers(3, min(vocab, 128), SEQ)]
        hf_logits = logits(hf, ids)
        result = {"ids": np.array(ids)}
        llama_cpp_convert(args.llama_cpp, folder, folder / "llama.cpp.gguf")
        with tempfile.TemporaryDirectory() as tmp:
            for type_ in TYPES:
                ours = convert(folder, Path(tmp) / f"{type_}.gguf", type_)
                result[f"digest_{type_}"] = np.array(digest(ours))
                result[f"lcpp_logits_{type_}"] = llama_cpp_logits(ours, ids)
        np.savez_compressed(folder / "expected.npz", **result)
        err = np.abs(result["lcpp_logits_F32"] - hf_logits).max() / np.abs(hf_logits).max()
        print(f"{family}: llama.cpp on our F32 file vs transformers: {err:.1e} "
              "(max |d| / max |logit|)")


if __name__ == "__main__":
    main()
