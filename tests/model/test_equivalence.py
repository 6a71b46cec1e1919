"""Our forward pass against transformers: fp32 logits within 1e-4, identical greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.model.config import UnsupportedModelError
from server.model.llama import PagedKVCache, StepInput
from server.model.loader import load_model

VARIANTS = [
    ("llama", {}),  # tied embeddings, GQA 4:2
    ("llama", {"attention_bias": True, "tie_word_embeddings": False}),
    ("mistral", {}),  # untied, GQA 4:1
    ("qwen2", {}),  # q/k/v bias, 3 layers
]


def _prefill_and_decode(model, ids: list[int], new_tokens: int):
    """Greedy decode with our runtime through a paged cache; return (prefill logits [S, V], tokens)."""
    rt = model.runtime
    cache = PagedKVCache(model.args, num_pages=32, page_size=4, dtype=torch.float32, device="cpu")
    table = torch.randperm(32, generator=torch.Generator().manual_seed(0))[None]  # deliberately scattered pages
    step = StepInput(start=torch.tensor([0]), lengths=torch.tensor([len(ids)]), block_tables=table,
                     input_ids=torch.tensor([ids]))
    logits = rt.forward(step, cache, all_logits=True)[0]
    tokens, n, nxt = [], len(ids), int(logits[-1].argmax())
    for _ in range(new_tokens):
        tokens.append(nxt)
        step = StepInput(start=torch.tensor([n]), lengths=torch.tensor([1]), block_tables=table,
                         input_ids=torch.tensor([[nxt]]))
        nxt = int(rt.forward(step, cache)[0].argmax())
        n += 1
    return logits, tokens


def _reference(folder, ids, new_tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
        out = hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    return logits, out[0, len(ids):].tolist()


# blas: transformers' own matmul kernel, so only our math can differ (1e-4, the contract);
# onednn: the faster default CPU kernel, which sums in another order (2e-4, same greedy tokens).
TOLERANCE = {"blas": 1e-4, "onednn": 2e-4}


@pytest.mark.parametrize("matmul", ["blas", "onednn"])
@pytest.mark.parametrize("arch,overrides", VARIANTS, ids=lambda v: str(v))
def test_tiny_models_match_transformers(tiny_model_factory, arch, overrides, matmul):
    folder = tiny_model_factory(arch, **overrides)
    model = load_model(str(folder), matmul=matmul)
    ids = model.tokenizer.encode("the quick brown fox jumps over the lazy dog")
    ours, our_tokens = _prefill_and_decode(model, ids, 12)
    ref, ref_tokens = _reference(folder, ids, 12)
    assert (ours - ref).abs().max().item() < TOLERANCE[matmul]
    assert ref_tokens and our_tokens[: len(ref_tokens)] == ref_tokens  # generate() stops at EOS


def test_sharded_checkpoint_loads_identically(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("mistral")
    state = load_file(str(folder / "model.safetensors"))
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    out = tmp_path / "sharded"
    out.mkdir()
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in ks})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = load_model(str(folder)), load_model(str(out))
    ids = a.tokenizer.encode("hello world")
    assert _prefill_and_decode(a, ids, 4)[1] == _prefill_and_decode(b, ids, 4)[1]


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_model(str(tmp_path))


def test_missing_folder_is_refused_without_download(tmp_path):
    with pytest.raises(UnsupportedModelError, match="not a local folder"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.slow
@pytest.mark.parametrize("matmul", ["blas", "onednn"])
def test_default_model_matches_transformers(matmul):
    model = load_model("default", matmul=matmul)
    ids = model.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    ours, our_tokens = _prefill_and_decode(model, ids, 16)
    ref, ref_tokens = _reference(model.folder, ids, 16)
    assert (ours - ref).abs().max().item() < TOLERANCE[matmul]
    assert our_tokens[: len(ref_tokens)] == ref_tokens  # generate() stops at EOS
    assert model.tokenizer.decode(our_tokens).strip()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_dtypes_run_close_to_float32(tiny_model_factory, dtype):
    folder = tiny_model_factory("qwen2")
    full = load_model(str(folder))
    low = load_model(str(folder), dtype=dtype)
    assert low.runtime.w.layers[0].wqkv.dtype == getattr(torch, dtype)
    ids = full.tokenizer.encode("hello world, this is")
    ref, _ = _prefill_and_decode(full, ids, 1)
    cache = PagedKVCache(low.args, num_pages=8, page_size=8, dtype=getattr(torch, dtype), device="cpu")
    step = StepInput(start=torch.tensor([0]), lengths=torch.tensor([len(ids)]), block_tables=torch.arange(8)[None],
                     input_ids=torch.tensor([ids]))
    logits = low.runtime.forward(step, cache, all_logits=True)[0]
    assert logits.dtype == torch.float32
    assert (logits - ref).abs().max().item() < 0.1  # reduced-precision rounding, not a different model
