"""Adapter files: real PEFT adapters parse to PEFT's own numbers; bad files, ids and paths are refused clearly."""

from __future__ import annotations

import builtins
import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from server.adapters import formats
from server.adapters.formats import (
    AdapterFormatError,
    AdapterKind,
    AdapterLimits,
    AdapterPathError,
    LoraWeights,
    PrefixWeights,
    PromptWeights,
    load_adapter_dir,
    load_adapter_files,
    resolve_adapter_path,
    validate_adapter_id,
)
from server.model.config import ModelArgs
from tests.peft_reference import (
    load_reference_model,
    make_peft_adapter,
    peft_config,
    peft_greedy_reference,
    randomize_adapter,
)

LIMITS = AdapterLimits()


def model_args(base_dir: Path) -> ModelArgs:
    return ModelArgs.from_hf_config(json.loads((base_dir / "config.json").read_text()))


def read_files(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) of a saved adapter, for mutation."""
    config = json.loads((folder / "adapter_config.json").read_text())
    return config, st_load((folder / "adapter_model.safetensors").read_bytes())


def to_bytes(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[bytes, bytes]:
    return json.dumps(config).encode(), st_save({k: v.contiguous() for k, v in tensors.items()})


@pytest.fixture(scope="module")
def llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def saved(llama, tmp_path_factory) -> dict[str, Path]:
    """One adapter of each kind on the tiny llama, saved by PEFT."""
    root = tmp_path_factory.mktemp("formats")
    return {kind: make_peft_adapter(llama, root / kind, kind, seed=i)
            for i, kind in enumerate(["lora", "prompt", "ptuning", "prefix"])}


# ------------------------------------------------------------------------------------------ real PEFT adapters

KIND_CASES = [
    # (arch, kind, config overrides, expected kind, rank, virtual tokens, target modules)
    ("llama", "lora", {}, AdapterKind.LORA, 4, 0, sorted(formats.LINEAR_MODULES)),
    ("qwen2", "lora", dict(r=6, target_modules=["q_proj", "v_proj"]), AdapterKind.LORA, 6, 0, ["q_proj", "v_proj"]),
    ("mistral", "lora", dict(target_modules="all-linear"), AdapterKind.LORA, 4, 0, sorted(formats.LINEAR_MODULES)),
    ("llama", "prompt", {}, AdapterKind.PROMPT_TUNING, 0, 4, []),
    ("qwen2", "prompt", dict(num_virtual_tokens=7), AdapterKind.PROMPT_TUNING, 0, 7, []),
    ("llama", "ptuning", {}, AdapterKind.P_TUNING, 0, 4, []),
    ("llama", "ptuning", dict(encoder_reparameterization_type="LSTM"), AdapterKind.P_TUNING, 0, 4, []),
    ("llama", "prefix", {}, AdapterKind.PREFIX_TUNING, 0, 4, []),
    ("mistral", "prefix", dict(num_virtual_tokens=3), AdapterKind.PREFIX_TUNING, 0, 3, []),
    ("qwen2", "prefix", dict(prefix_projection=True), AdapterKind.PREFIX_TUNING, 0, 4, []),
]


@pytest.mark.parametrize("arch,kind,overrides,want_kind,rank,n_virtual,targets", KIND_CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(KIND_CASES)])
def test_peft_adapter_parses(tiny_model_factory, tmp_path, arch, kind, overrides, want_kind, rank, n_virtual,
                             targets):
    base = tiny_model_factory(arch)
    args = model_args(base)
    folder = make_peft_adapter(base, tmp_path / "a", kind, **overrides)
    spec = load_adapter_dir(folder, args, LIMITS)
    assert (spec.kind, spec.rank, spec.num_virtual_tokens, spec.target_modules) == (want_kind, rank, n_virtual,
                                                                                    targets)
    assert spec.base_model == str(base) and spec.config["peft_type"] == want_kind.value
    tensors = _spec_tensors(spec.weights)
    assert spec.size_bytes == sum(t.nbytes for t in tensors) > 0
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
    w = spec.weights
    if want_kind == AdapterKind.LORA:
        assert {layer for layer, _ in w.modules} == set(range(args.num_layers))
        for (_, name), m in w.modules.items():
            out_f, in_f = args.linear_shape(name)
            assert m.a.shape == (rank, in_f) and m.b.shape == (out_f, rank)
    elif want_kind == AdapterKind.PREFIX_TUNING:
        shape = (args.num_layers, args.num_kv_heads, n_virtual, args.head_dim)
        assert w.keys.shape == shape and w.values.shape == shape
    else:
        assert w.embeddings.shape == (n_virtual, args.hidden_size)


def _spec_tensors(w) -> list[torch.Tensor]:
    if isinstance(w, LoraWeights):
        return [t for m in w.modules.values() for t in (m.a, m.b)]
    if isinstance(w, PrefixWeights):
        return [w.keys, w.values]
    assert isinstance(w, PromptWeights)
    return [w.embeddings]


LORA_MATH_CASES = [
    # (id, config overrides, {module path: (rank, scale)} spot checks computed by hand)
    ("plain", dict(r=4, lora_alpha=8), {"model.layers.0.self_attn.q_proj": (4, 2.0)}),
    ("rank_alpha_pattern", dict(
        r=4, lora_alpha=8,
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 8},
        alpha_pattern={"v_proj": 3, "model.layers.0.self_attn.o_proj": 16, "down_proj": 4}), {
        "model.layers.0.self_attn.q_proj": (2, 4.0),
        "model.layers.1.mlp.down_proj": (8, 0.5),
        "model.layers.0.mlp.down_proj": (4, 1.0),
        "model.layers.1.self_attn.v_proj": (4, 0.75),
        "model.layers.0.self_attn.o_proj": (4, 4.0),
        "model.layers.1.self_attn.o_proj": (4, 2.0)}),
    ("rslora", dict(r=8, lora_alpha=16, use_rslora=True), {"model.layers.1.mlp.up_proj": (8, 16 / math.sqrt(8))}),
    ("rslora_pattern", dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"k_proj": 9}),
     {"model.layers.0.self_attn.k_proj": (9, 8 / 3), "model.layers.0.self_attn.q_proj": (4, 4.0)}),
    ("layers_to_transform", dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=[1]),
     {"model.layers.1.mlp.gate_proj": (4, 2.0)}),
]


@pytest.mark.parametrize("overrides,expected", [c[1:] for c in LORA_MATH_CASES], ids=[c[0] for c in LORA_MATH_CASES])
def test_lora_math_equals_peft(llama, tmp_path, overrides, expected):
    """x W^T + s (x A^T) B^T equals PEFT's LoRA layer, for every module PEFT adapted and no other."""
    args = model_args(llama)
    folder = make_peft_adapter(llama, tmp_path / "lora", "lora", seed=5, **overrides)
    spec = load_adapter_dir(folder, args, LIMITS)
    peft = load_reference_model(llama, folder)
    adapted = {name.removeprefix("base_model.model.") for name, mod in peft.named_modules()
               if hasattr(mod, "lora_A") and "default" in mod.lora_A}
    assert {args.module_path(layer, name) for layer, name in spec.weights.modules} == adapted
    by_path = {args.module_path(layer, name): m for (layer, name), m in spec.weights.modules.items()}
    for path, (rank, scale) in expected.items():
        assert by_path[path].a.shape[0] == rank and by_path[path].scale == pytest.approx(scale)
    torch.manual_seed(0)
    for path, m in by_path.items():
        layer = peft.get_submodule("base_model.model." + path)
        assert layer.scaling["default"] == pytest.approx(m.scale, rel=1e-12)
        x = torch.randn(3, m.a.shape[1])  # [tokens, in]
        ours = layer.base_layer(x) + m.scale * (x @ m.a.T) @ m.b.T  # [tokens, out]
        with torch.no_grad():
            torch.testing.assert_close(ours, layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, dict(prefix_projection=True)], ids=["plain", "prefix_projection"])
def test_prefix_keys_values_equal_peft_past_key_values(llama, tmp_path, overrides):
    """Our [L, H_kv, n, D] keys/values are PEFT's past_key_values, both for the training-mode encoder
    (before saving: the MLP runs for prefix_projection) and for the adapter PEFT loads back."""
    from peft import get_peft_model

    args = model_args(llama)
    torch.manual_seed(0)
    live = get_peft_model(load_reference_model(llama), peft_config("prefix", **overrides))
    randomize_adapter(live, "prefix", seed=1)
    live.save_pretrained(tmp_path / "p")
    spec = load_adapter_dir(tmp_path / "p", args, LIMITS)
    loaded = load_reference_model(llama, tmp_path / "p")
    with torch.no_grad():
        for cache in (live.get_prompt(batch_size=1), loaded.get_prompt(batch_size=1)):
            for layer in range(args.num_layers):
                torch.testing.assert_close(cache.layers[layer].keys[0], spec.weights.keys[layer], rtol=0, atol=1e-6)
                torch.testing.assert_close(cache.layers[layer].values[0], spec.weights.values[layer], rtol=0,
                                           atol=1e-6)


@pytest.mark.parametrize("kind,overrides", [("prompt", {}), ("ptuning", {}),
                                            ("ptuning", dict(encoder_reparameterization_type="LSTM"))])
def test_prompt_embeddings_equal_peft_prompts(llama, tmp_path, kind, overrides):
    """P-tuning saves the encoder's output: the live (MLP / LSTM) prompts equal the parsed embeddings."""
    from peft import get_peft_model

    torch.manual_seed(0)
    live = get_peft_model(load_reference_model(llama), peft_config(kind, **overrides))
    randomize_adapter(live, kind, seed=2)
    live.save_pretrained(tmp_path / "p")
    spec = load_adapter_dir(tmp_path / "p", model_args(llama), LIMITS)
    loaded = load_reference_model(llama, tmp_path / "p")
    with torch.no_grad():
        for prompts in (live.get_prompt(batch_size=1), loaded.get_prompt(batch_size=1)):
            torch.testing.assert_close(prompts[0], spec.weights.embeddings, rtol=0, atol=1e-6)


def test_reference_adapters_change_greedy_output(llama, saved):
    """The oracle's adapters matter: each kind changes the tiny llama's greedy tokens; no adapter = generate()."""
    from transformers import AutoModelForCausalLM

    prompts = [[5, 40, 41, 42], [7, 8, 9, 10, 11, 12]]
    base_refs = [peft_greedy_reference(llama, None, p, 6) for p in prompts]
    hf = AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32).eval()
    for p, (tokens, logprobs) in zip(prompts, base_refs, strict=True):
        out = hf.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert out[0, len(p):].tolist() == tokens and all(lp <= 0 for lp in logprobs)
    for kind, folder in saved.items():
        refs = [peft_greedy_reference(llama, folder, p, 6) for p in prompts]
        assert any(r[0] != b[0] for r, b in zip(refs, base_refs, strict=True)), kind
    tokens, logprobs, tops = peft_greedy_reference(llama, saved["lora"], prompts[0], 2, top_logprobs=3)
    assert [t[0][0] for t in tops] == tokens and [t[0][1] for t in tops] == logprobs


# ------------------------------------------------------------------------------------------ refused adapters


def _add(**tensors):
    return lambda c, t: t.update(tensors)


def _set(**fields):
    return lambda c, t: c.update(fields)


def _pop(key):
    return lambda c, t: t.pop(key)


def _replace(key, value):
    return lambda c, t: t.__setitem__(key, value)


def _only(**tensors):
    def mutate(c, t):
        t.clear()
        t.update(tensors)
    return mutate


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

BAD_ADAPTER_CASES = [
    # (id, kind, mutate(config, tensors), limits, message fragment)
    ("unknown_peft_type", "lora", _set(peft_type="BOFT"), LIMITS, "unsupported peft_type BOFT"),
    ("dora_as_type", "lora", _set(peft_type="DORA"), LIMITS, "unsupported peft_type DORA"),
    ("adalora", "lora", _set(peft_type="ADALORA"), LIMITS, "unsupported peft_type ADALORA"),
    ("no_peft_type", "prompt", _set(peft_type=None), LIMITS, "has no peft_type"),
    ("task_type", "lora", _set(task_type="SEQ_CLS"), LIMITS, "unsupported task_type SEQ_CLS"),
    ("dora", "lora", _set(use_dora=True), LIMITS, "use_dora"),
    ("dora_tensor", "lora", _add(**{Q_A.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(64)}),
     LIMITS, "use_dora"),
    ("modules_to_save", "lora", _set(modules_to_save=["lm_head"]), LIMITS, "modules_to_save"),
    ("lora_bias", "lora", _set(lora_bias=True), LIMITS, "lora_bias"),
    ("bias_all", "lora", _set(bias="all"), LIMITS, "bias='all'"),
    ("qalora", "lora", _set(use_qalora=True), LIMITS, "use_qalora"),
    ("alora", "lora", _set(alora_invocation_tokens=[1, 2]), LIMITS, "alora_invocation_tokens"),
    ("target_parameters", "lora", _set(target_parameters=["mlp.experts"]), LIMITS, "target_parameters"),
    ("trainable_tokens", "lora", _set(trainable_token_indices=[3]), LIMITS, "trainable_token_indices"),
    ("layer_replication", "lora", _set(layer_replication=[[0, 2], [1, 2]]), LIMITS, "layer_replication"),
    ("pissa", "lora", _set(init_lora_weights="pissa_niter_4"), LIMITS, "init_lora_weights='pissa_niter_4'"),
    ("lm_head", "lora", _add(**{"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                                "base_model.model.lm_head.lora_B.weight": torch.zeros(320, 4)}),
     LIMITS, "unsupported LoRA target lm_head"),
    ("embed_tokens", "lora", _add(**{"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 320)}),
     LIMITS, "unsupported LoRA target: embeddings"),
    ("embed_linear", "lora", _add(**{"base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(4, 64)}),
     LIMITS, "unsupported LoRA target embed_tokens"),
    ("wrong_block", "lora", _add(**{Q_A.replace("self_attn", "mlp"): torch.zeros(4, 64)}),
     LIMITS, "unsupported LoRA target q_proj"),
    ("zero_modules", "lora", _only(), LIMITS, "matches no modules"),
    ("unexpected", "lora", _add(foo=torch.zeros(2)), LIMITS, "unexpected tensor foo"),
    ("wrong_in", "lora", _replace(Q_A, torch.zeros(4, 32)), LIMITS,
     "shape mismatch at model.layers.0.self_attn.q_proj"),
    ("wrong_out", "lora", _replace(Q_B, torch.zeros(32, 4)), LIMITS, "base projection is [out=64, in=64]"),
    ("rank_disagree", "lora", _replace(Q_B, torch.zeros(64, 3)), LIMITS, "are not [r, in] and [out, r]"),
    ("not_2d", "lora", _replace(Q_B, torch.zeros(64)), LIMITS, "are not [r, in] and [out, r]"),
    ("missing_b", "lora", _pop(Q_B), LIMITS, "has no lora_B"),
    ("too_many_layers", "lora", _add(**{Q_A.replace("layers.0", "layers.2"): torch.zeros(4, 64),
                                        Q_B.replace("layers.0", "layers.2"): torch.zeros(64, 4)}),
     LIMITS, "LoRA targets layer 2 but the base model has 2 layers"),
    ("rank_over_max", "lora", lambda c, t: None, AdapterLimits(max_lora_rank=2),
     "rank 4 of model.layers.0.mlp.down_proj exceeds max_lora_rank 2"),
    ("rank_zero", "lora", _only(**{Q_A: torch.zeros(0, 64), Q_B: torch.zeros(64, 0)}), LIMITS, "has rank 0"),
    ("config_rank", "lora", _set(r=16), LIMITS, "config gives rank 16 (r / rank_pattern) but lora_A has rank 4"),
    ("rank_pattern", "lora", _set(rank_pattern={"v_proj": 2}), LIMITS, "self_attn.v_proj: config gives rank 2"),
    ("bad_regex", "lora", _set(alpha_pattern={"(": 2}), LIMITS, "alpha_pattern has an invalid pattern"),
    ("pattern_value", "lora", _set(alpha_pattern={"q_proj": "big"}), LIMITS, "alpha_pattern must be an object mapping module patterns to finite numbers"),
    ("int_dtype", "lora", _replace(Q_A, torch.zeros(4, 64, dtype=torch.int64)), LIMITS, "dtype torch.int64"),
    ("prompt_over_max", "prompt", lambda c, t: None, AdapterLimits(max_virtual_tokens=3),
     "num_virtual_tokens 4 exceeds max_virtual_tokens 3"),
    ("prompt_width", "prompt", _replace("prompt_embeddings", torch.zeros(4, 32)), LIMITS,
     "width 32 but the base hidden_size is 64"),
    ("prompt_count", "ptuning", _set(num_virtual_tokens=9), LIMITS,
     "num_virtual_tokens is 9 but prompt_embeddings has 4 rows"),
    ("prompt_missing", "prompt", _only(), LIMITS, "has no prompt_embeddings"),
    ("prompt_extra", "ptuning", _add(**{"prompt_encoder.mlp.weight": torch.zeros(2, 2)}), LIMITS,
     "unexpected tensor prompt_encoder.mlp.weight"),
    ("prompt_3d", "prompt", _replace("prompt_embeddings", torch.zeros(1, 4, 64)), LIMITS, "must be 2-D"),
    ("submodules", "prompt", _set(num_transformer_submodules=2), LIMITS, "num_transformer_submodules=2"),
    ("prefix_layers", "prefix", _set(num_layers=3), LIMITS, "prefix num_layers is 3 but the base model has 2"),
    ("prefix_heads", "prefix", _set(num_attention_heads=4), LIMITS,
     "prefix has 4 KV heads x head_dim 8 (num_attention_heads, token_dim) but the base model has 2 x 16"),
    ("prefix_token_dim", "prefix", _set(token_dim=33), LIMITS, "token_dim 33 is not a multiple"),
    ("prefix_width", "prefix", _replace("prompt_embeddings", torch.zeros(4, 192)), LIMITS,
     "expected num_layers*2*token_dim = 128"),
    ("prefix_over_max", "prefix", lambda c, t: None, AdapterLimits(max_virtual_tokens=2),
     "num_virtual_tokens 4 exceeds max_virtual_tokens 2"),
]


@pytest.mark.parametrize("kind,mutate,limits,fragment", [c[1:] for c in BAD_ADAPTER_CASES],
                         ids=[c[0] for c in BAD_ADAPTER_CASES])
def test_bad_adapter_refused(llama, saved, kind, mutate, limits, fragment):
    config, tensors = read_files(saved[kind])
    mutate(config, tensors)
    with pytest.raises(AdapterFormatError) as err:
        load_adapter_files(*to_bytes(config, tensors), model_args(llama), limits)
    assert fragment in str(err.value)


def _truncate(n):
    return lambda c, w: (c, w[:-n])


BAD_FILE_CASES = [
    # (id, mutate(config bytes, weights bytes) -> (config bytes, weights bytes), message fragment)
    ("json_corrupt", lambda c, w: (b"{not json", w), "adapter_config.json is not valid JSON"),
    ("json_not_utf8", lambda c, w: (b"\xff\xfe{", w), "adapter_config.json is not valid JSON"),
    ("json_list", lambda c, w: (b"[1, 2]", w), "must hold a JSON object, not list"),
    ("json_huge", lambda c, w: (b" " * (formats.MAX_CONFIG_BYTES + 1), w), "larger than 1 MiB"),
    ("truncated_data", _truncate(10), "adapter_model.safetensors is truncated or corrupt"),
    ("truncated_header", lambda c, w: (c, w[:20]), "header length"),
    ("empty", lambda c, w: (c, b""), "adapter_model.safetensors is truncated (0 bytes)"),
    ("huge_header_length", lambda c, w: (c, b"\xff" * 8 + w[8:]), "header length 18446744073709551615"),
    ("garbage_header", lambda c, w: (c, w[:8] + b"!" * (len(w) - 8)), "unreadable header"),
    ("bad_dtype", lambda c, w: (c, w.replace(b'"F32"', b'"Q99"', 1)), "adapter_model.safetensors is corrupt"),
]


@pytest.mark.parametrize("mutate,fragment", [c[1:] for c in BAD_FILE_CASES], ids=[c[0] for c in BAD_FILE_CASES])
def test_bad_files_refused(llama, saved, mutate, fragment):
    config, weights = mutate((saved["lora"] / "adapter_config.json").read_bytes(),
                             (saved["lora"] / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterFormatError) as err:
        load_adapter_files(config, weights, model_args(llama), LIMITS)
    assert fragment in str(err.value)


def test_oversized_weights_refused_before_reading(llama, saved, monkeypatch):
    monkeypatch.setattr(formats, "MAX_HEADER_BYTES", 0)  # cap = exactly the float64 bytes within the limits
    tiny = AdapterLimits(max_lora_rank=1, max_virtual_tokens=1, max_bottleneck_width=1)
    for load in (lambda: load_adapter_dir(saved["lora"], model_args(llama), tiny),
                 lambda: load_adapter_files(*[(saved["lora"] / n).read_bytes() for n in
                                              ("adapter_config.json", "adapter_model.safetensors")],
                                            model_args(llama), tiny)):
        with pytest.raises(AdapterFormatError, match="larger than any adapter within the limits"):
            load()


class _Marker:
    """Unpickling this creates the marker file: proof that a pickle was (or was not) opened."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt", "weights.pth", "adapter.pkl"])
def test_pickle_refused_without_opening(saved, llama, tmp_path, name):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Marker(marker))
    pickle.loads(payload).close()  # the payload works ...
    assert marker.exists()
    marker.unlink()
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((saved["lora"] / "adapter_config.json").read_bytes())
    (folder / name).write_bytes(payload)
    with pytest.raises(AdapterFormatError) as err:
        load_adapter_dir(folder, model_args(llama), LIMITS)
    assert f"holds {name} but no adapter_model.safetensors: safetensors only" in str(err.value)
    assert not marker.exists()  # ... and was never opened
    (folder / "adapter_model.safetensors").write_bytes((saved["lora"] / "adapter_model.safetensors").read_bytes())
    assert load_adapter_dir(folder, model_args(llama), LIMITS).kind == AdapterKind.LORA  # the pickle is ignored
    assert not marker.exists()


@pytest.mark.parametrize("present,fragment", [
    ([], "adapter folder has no adapter_model.safetensors"),
    (["adapter_model.safetensors"], "adapter folder has no adapter_config.json"),
    (["adapter_config.json"], "adapter folder has no adapter_model.safetensors"),
])
def test_incomplete_folder_refused(saved, llama, tmp_path, present, fragment):
    for name in present:
        (tmp_path / name).write_bytes((saved["lora"] / name).read_bytes())
    with pytest.raises(AdapterFormatError, match=fragment):
        load_adapter_dir(tmp_path, model_args(llama), LIMITS)


def test_missing_folder_refused(llama, tmp_path):
    with pytest.raises(AdapterPathError, match="does not exist"):
        load_adapter_dir(tmp_path / "nope", model_args(llama), LIMITS)


# ------------------------------------------------------------------------------------------ ids and paths

ID_CASES = [
    ("a", True), ("my-adapter_v1.2", True), ("A" * 128, True), ("..a", True), ("-", True),
    ("", False), (".", False), ("..", False), ("A" * 129, False), ("a/b", False), ("a b", False),
    ("ü", False), ("a\n", False), ("..\\x", False), ("a\x00", False), (None, False), (5, False),
]


@pytest.mark.parametrize("adapter_id,ok", ID_CASES, ids=[repr(c[0])[:20] for c in ID_CASES])
def test_validate_adapter_id(adapter_id, ok):
    if ok:
        validate_adapter_id(adapter_id)
    else:
        with pytest.raises(AdapterFormatError, match="adapter_id .* is invalid: use 1-128 characters"):
            validate_adapter_id(adapter_id)


@pytest.fixture
def adapter_root(tmp_path):
    """root/{a, nested/b, file.txt, inlink -> a, out -> ../outside, a/esc -> ../../outside}."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for d in (root / "a", root / "nested" / "b", outside):
        d.mkdir(parents=True)
    (root / "file.txt").write_text("x")
    os.symlink(root / "a", root / "inlink")
    os.symlink("../outside", root / "out")
    os.symlink("../../outside", root / "a" / "esc")
    return root


PATH_CASES = [
    ("a", "a"), ("nested/b", "nested/b"), ("nested/b/", "nested/b"), ("inlink", "a"), ("./a", "a"),
    ("../outside", "contains '..'"), ("a/../a", "contains '..'"), ("nested\\..\\..\\outside", "contains '..'"),
    ("/etc", "is absolute"), ("\\etc", "is absolute"),
    ("out", "escapes the adapter root"), ("a/esc", "escapes the adapter root"),
    ("missing", "is not an adapter folder"), ("file.txt", "is not an adapter folder"),
    ("", "relative to the adapter root"), ("a\x00", "relative to the adapter root"),
    (".", "must name a folder inside the adapter root"),
]


@pytest.mark.parametrize("rel,expect", PATH_CASES, ids=[repr(c[0]) for c in PATH_CASES])
def test_resolve_adapter_path(adapter_root, rel, expect):
    if expect in ("a", "nested/b"):
        assert resolve_adapter_path(str(adapter_root), rel) == (adapter_root / expect).resolve()
    else:
        with pytest.raises(AdapterPathError) as err:
            resolve_adapter_path(adapter_root, rel)
        assert expect in str(err.value)
        assert str(adapter_root) not in str(err.value)  # no server paths in client-facing messages


def test_root_must_exist(tmp_path):
    with pytest.raises(AdapterPathError, match="adapter root is not a folder"):
        resolve_adapter_path(tmp_path / "nope", "a")
