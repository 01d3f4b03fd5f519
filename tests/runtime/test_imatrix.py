"""`diptych imatrix`: llama-imatrix's statistics, checked against the inputs transformers
feeds the same matrices, its GGUF file as gguf-py reads it, the legacy .dat format, and
`quantize --imatrix` end to end."""

import struct

import gguf
import numpy as np
import pytest
import torch

import diptych
from diptych.cli.main import main
from diptych.errors import InvalidArgumentError, ModelFileError
from diptych.inference.imatrix import Imatrix, collect_imatrix

from ..tiny_models import tiny_hf_model, write_gguf

N_CTX = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = tiny_hf_model("llama", seed=8)
    path = write_gguf(hf, "llama", tmp_path_factory.mktemp("im") / "m.gguf", "F32")
    return hf, path


def transformers_sums(hf, chunks):
    """Per HF module: the sum of squared inputs per column and the row count, by hooks."""
    stats = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            s, n = stats.get(name, (0, 0))
            stats[name] = (s + (x * x).sum(0).numpy(), n + x.shape[0])
        return record
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in hf.named_modules()
               if isinstance(m, torch.nn.Linear) and "layers" in n]
    with torch.no_grad():
        for chunk in chunks:
            hf(torch.tensor([chunk]))
    for h in handles:
        h.remove()
    return stats


def test_statistics_are_the_matrices_inputs(tiny):
    hf, path = tiny
    model = diptych.load(path, backend="torch", device="cpu", n_ctx=64)
    ids = [int(i) for i in np.random.default_rng(2).integers(3, 128, 3 * N_CTX + 5)]
    im = collect_imatrix(model, ids, N_CTX, "random ids")
    # llama-imatrix's chunks: whole n_ctx runs, the first token of each replaced by BOS
    chunks = [[model.tokenizer.bos_id] + ids[c * N_CTX + 1:(c + 1) * N_CTX] for c in range(3)]
    ref = transformers_sums(hf, chunks)
    hf_names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    assert sorted(im.entries) == sorted(f"blk.{i}.{k}.weight" for i in range(2) for k in hf_names)
    for i in range(2):
        for kind, hf_name in hf_names.items():
            sums, counts = im.entries[f"blk.{i}.{kind}.weight"]
            want, n = ref[f"model.layers.{i}.{hf_name}"]
            assert counts.tolist() == [n] == [3 * N_CTX]
            np.testing.assert_allclose(sums[0], want, rtol=1e-4)
    assert (im.chunk_count, im.chunk_size, im.datasets) == (3, N_CTX, ["random ids"])
    with pytest.raises(InvalidArgumentError, match="at least one chunk"):
        collect_imatrix(model, ids[:N_CTX - 1], N_CTX)


def test_files_llama_cpp_reads(tiny, tmp_path):
    hf, path = tiny
    model = diptych.load(path, backend="torch", device="cpu", n_ctx=64)
    ids = [int(i) for i in np.random.default_rng(3).integers(3, 128, 2 * N_CTX)]
    im = collect_imatrix(model, ids, N_CTX, "data.txt")
    im.save(tmp_path / "im.gguf", "llama")
    # llama.cpp's layout, read by gguf-py: ne (n_in, n_mat) sums, (1, n_mat) counts, F32
    r = gguf.GGUFReader(tmp_path / "im.gguf")
    fields = {f.name: f for f in r.fields.values()}
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.datasets"].contents() == ["data.txt"]
    assert (fields["imatrix.chunk_count"].contents(), fields["imatrix.chunk_size"].contents()) \
        == (2, N_CTX)
    tensors = {t.name: t for t in r.tensors}
    sums = tensors["blk.1.ffn_down.weight.in_sum2"]
    assert sums.tensor_type == gguf.GGMLQuantizationType.F32
    assert list(sums.shape) == [96, 1] and list(tensors["blk.1.ffn_down.weight.counts"].shape) \
        == [1, 1]
    np.testing.assert_allclose(sums.data.reshape(-1), im.entries["blk.1.ffn_down.weight"][0][0],
                               rtol=1e-6)
    back = Imatrix.load(tmp_path / "im.gguf")
    for name in im.entries:
        np.testing.assert_allclose(back.importance(name), im.importance(name), rtol=1e-6)
    # the legacy .dat: per entry the name, ncall, nval and sum / count * ncall
    legacy = tmp_path / "im.dat"
    with open(legacy, "wb") as f:
        f.write(struct.pack("<i", len(im.entries)))
        for name, (s, n) in im.entries.items():
            f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", 2, s.size))
            f.write((s[0] / n[0] * 2).astype("<f4").tobytes())
        f.write(struct.pack("<ii", 2, 8) + b"data.txt")
    old = Imatrix.load(legacy)
    assert old.chunk_count == 2 and old.datasets == ["data.txt"]
    for name in im.entries:
        np.testing.assert_allclose(old.importance(name), im.importance(name), rtol=1e-6)
    legacy.write_bytes(b"\x05\x00\x00\x00junk")
    with pytest.raises(ModelFileError, match="imatrix"):
        Imatrix.load(legacy)


def test_quantize_with_an_imatrix_from_the_command_line(tmp_path):
    """`diptych imatrix` then `diptych quantize --imatrix`: the K-quant matrices differ from
    a plain quantization, and an imatrix of another model is refused."""
    # rows of 256 and 512 values, so that the mix has K-quant matrices
    hf = tiny_hf_model("llama", seed=9, hidden_size=256, intermediate_size=512)
    path = write_gguf(hf, "llama", tmp_path / "m.gguf", "F32")
    text = tmp_path / "data.txt"
    text.write_text("the cat sat on the mat and the dog ran after it. " * 60)

    def cli(*args):
        assert main(list(args)) == 0

    cli("imatrix", str(path), str(text), "-o", str(tmp_path / "im.gguf"), "--ctx", "32",
        "--backend", "torch")
    assert Imatrix.load(tmp_path / "im.gguf").chunk_size == 32
    diptych.quantize(path, tmp_path / "plain.gguf", "Q4_K_M")
    cli("quantize", str(path), str(tmp_path / "weighted.gguf"), "--type", "Q4_K_M",
        "--imatrix", str(tmp_path / "im.gguf"))
    from diptych.quant.gguf_file import GGUFFile

    plain, weighted = GGUFFile(tmp_path / "plain.gguf"), GGUFFile(tmp_path / "weighted.gguf")
    k = [n for n, t in weighted.tensors.items() if t.type_name in ("Q4_K", "Q5_K")]
    assert k and any((weighted.tensors[n].data != plain.tensors[n].data).any() for n in k)
    other = Imatrix(entries={"blk.0.ffn_down.weight": (np.ones((1, 7)), np.ones(1))})
    with pytest.raises(ModelFileError, match="another model"):
        diptych.quantize(path, tmp_path / "x.gguf", "Q4_K_M", imatrix=other)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    hf = tiny_hf_model("qwen3moe", seed=5)
    path = write_gguf(hf, "qwen3moe", tmp_path_factory.mktemp("moe") / "moe.gguf", "F32")
    ids = [int(i) for i in np.random.default_rng(4).integers(3, 128, 2 * N_CTX)]
    im = collect_imatrix(diptych.load(path, backend="torch", device="cpu", n_ctx=64), ids,
                         N_CTX)
    return hf, path, ids, im


def test_routed_experts_get_per_expert_statistics(moe, tmp_path):
    """A Qwen3-MoE model: each expert's row sums the squared inputs of the (token, expert)
    pairs routed to it and counts them, as llama-imatrix records mul_mat_id (checked against
    transformers' routing and expert activations); `quantize --imatrix` weighs each
    expert's matrix by its own row."""
    hf, path, ids, im = moe
    model = diptych.load(path, backend="torch", device="cpu", n_ctx=64)
    chunks = [[model.tokenizer.bos_id] + ids[c * N_CTX + 1:(c + 1) * N_CTX] for c in range(2)]
    want = {}

    def record(layer):
        def hook(module, args):
            x, chosen = args[0].detach().double(), args[1]
            for e in range(module.num_experts):
                tok = (chosen == e).any(-1)
                gate, up = torch.nn.functional.linear(
                    x[tok], module.gate_up_proj[e].double()).chunk(2, dim=-1)
                h = module.act_fn(gate) * up
                for kind, rows in (("gate", x[tok]), ("up", x[tok]), ("down", h)):
                    s, n = want.setdefault((layer, kind), ([0] * module.num_experts,
                                                           [0] * module.num_experts))
                    s[e] = s[e] + (rows * rows).sum(0).numpy()
                    n[e] += int(tok.sum())
        return hook
    handles = [layer.mlp.experts.register_forward_pre_hook(record(i))
               for i, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        for chunk in chunks:
            hf(torch.tensor([chunk]))
    for h in handles:
        h.remove()
    for (layer, kind), (s, n) in want.items():
        sums, counts = im.entries[f"blk.{layer}.ffn_{kind}_exps.weight"]
        assert counts.tolist() == n and sum(n) == 2 * 2 * N_CTX   # 2 experts per token
        np.testing.assert_allclose(sums, np.stack(s), rtol=1e-4)
    im.save(tmp_path / "im.gguf", "qwen3moe")
    back = Imatrix.load(tmp_path / "im.gguf")
    assert back.entries["blk.1.ffn_down_exps.weight"][0].shape == (4, 32)
    diptych.quantize(path, tmp_path / "q.gguf", "Q4_0", imatrix=tmp_path / "im.gguf")
    from diptych.quant.gguf_file import GGUFFile
    from diptych.quant.quantize import quantize_rows

    src = GGUFFile(path).tensors["blk.0.ffn_up_exps.weight"].dequantize()
    got = GGUFFile(tmp_path / "q.gguf").tensors["blk.0.ffn_up_exps.weight"]
    qw = back.importance("blk.0.ffn_up_exps.weight")
    for e in range(4):
        np.testing.assert_array_equal(got.data.reshape(4, -1)[e],
                                      quantize_rows(src[e], got.ggml_type, qw[e]).reshape(-1))
    assert (got.data.reshape(4, -1)[1] != quantize_rows(src[1], got.ggml_type, qw[0])
            .reshape(-1)).any()


def test_mlx_observes_the_experts_as_torch_does(moe):
    pytest.importorskip("mlx.core")
    _, path, ids, im = moe
    other = collect_imatrix(diptych.load(path, backend="mlx", n_ctx=64), ids, N_CTX)
    assert sorted(other.entries) == sorted(im.entries)
    for name, (sums, counts) in im.entries.items():
        assert other.entries[name][1].tolist() == counts.tolist(), name
        np.testing.assert_allclose(other.entries[name][0], sums, rtol=1e-3)
