"""The kinds beside LoRA and the prompt kinds (DoRA, IA3, LN tuning) and weighted LoRA mixes:
their PEFT files parsed into row vectors equal to PEFT's own quantities, and one step's per-row
math (AdapterBatch) equal to each row's definition for several row layouts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from server.adapters.formats import (
    AdapterFormatError,
    AdapterKind,
    AdapterLimits,
    load_adapter_dir,
    load_adapter_files,
)
from server.adapters.lora_batch import GROUPS, LoraBatch, LoraSlots, WeightedLoraBatch
from server.adapters.row_vectors import VectorSlots
from server.adapters.step_batch import AdapterBatch, RowVectorIndex
from server.model.config import ModelArgs
from server.model.weights import read_model_args
from tests.peft_reference import load_reference_model, make_peft_adapter


# ------------------------------------------------------------------------------------ formats vs PEFT
@pytest.fixture(scope="module")
def qwen(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen2")  # q/k/v biases: DoRA's shift and IA3's scaled bias matter


@pytest.fixture(scope="module")
def saved(qwen, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {
        "dora": make_peft_adapter(qwen, root / "dora", "dora", seed=1, r=4,
                                  target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
        "ia3": make_peft_adapter(qwen, root / "ia3", "ia3", seed=2, target_modules=["k_proj", "v_proj", "o_proj",
                                                                                   "up_proj", "down_proj"],
                                 feedforward_modules=["down_proj"]),
        "ln": make_peft_adapter(qwen, root / "ln", "ln", seed=3,
                                target_modules=["input_layernorm", "post_attention_layernorm", "norm"]),
    }


class RuntimeBase:
    """BaseWeights over a transformers model (the reference's own tensors)."""

    def __init__(self, model, args: ModelArgs):
        self.model, self.args = model, args

    def projection(self, layer, name):
        block = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        lin = getattr(getattr(self.model.model.layers[layer], block), name)
        return lin.weight.detach(), None if lin.bias is None else lin.bias.detach()

    def norm(self, layer, group):
        if group == "norm":
            return self.model.model.norm.weight.detach()
        mod = self.model.model.layers[layer]
        return (mod.input_layernorm if group == "attn_norm" else mod.post_attention_layernorm).weight.detach()


def test_dora_scale_is_peft_magnitude_over_weight_norm(qwen, saved):
    args = read_model_args(qwen)
    spec = load_adapter_dir(saved["dora"], args, AdapterLimits())
    assert spec.kind == AdapterKind.DORA and spec.rank == 4
    assert spec.target_modules == ["down_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    peft = load_reference_model(qwen, saved["dora"])
    base = RuntimeBase(peft.base_model.model, args)
    scales = spec.weights.scales(base)
    for (layer, name), g in scales.items():
        block = "mlp" if name in ("up_proj", "down_proj") else "self_attn"
        mod = getattr(getattr(peft.base_model.model.model.layers[layer], block), name)
        lora_w = mod.lora_B["default"].weight @ mod.lora_A["default"].weight
        norm = mod.lora_magnitude_vector["default"].get_weight_norm(mod.base_layer.weight, lora_w, mod.scaling["default"])
        want = mod.lora_magnitude_vector["default"].weight / norm
        torch.testing.assert_close(g, want.detach(), rtol=1e-5, atol=1e-6)
    vectors = spec.weights.row_vectors(base)
    assert (0, "qkv", "shift") in vectors  # qwen2 has q/k/v biases: (1 - g) * b
    assert (0, "o", "shift") not in vectors  # o_proj has none


def test_ia3_and_ln_vectors_are_the_saved_ones(qwen, saved):
    args = read_model_args(qwen)
    ia3 = load_adapter_dir(saved["ia3"], args, AdapterLimits())
    assert ia3.kind == AdapterKind.IA3 and ia3.target_modules == ["down_proj", "k_proj", "o_proj", "up_proj", "v_proj"]
    assert ia3.weights.feedforward == frozenset((layer, "down_proj") for layer in range(args.num_layers))
    vectors = ia3.weights.row_vectors(RuntimeBase(load_reference_model(qwen), args))
    q = args.num_heads * args.head_dim
    assert torch.equal(vectors[(0, "qkv", "out")][:q], torch.ones(q))  # q_proj is not a target
    assert set(role for _, _, role in vectors) == {"out", "in"}
    ln = load_adapter_dir(saved["ln"], args, AdapterLimits())
    assert ln.kind == AdapterKind.LN_TUNING
    assert ln.target_modules == ["input_layernorm", "norm", "post_attention_layernorm"]
    assert len(ln.weights.norms) == 2 * args.num_layers + 1
    assert ln.size_bytes == (2 * args.num_layers + 1) * args.hidden_size * 4


def _files(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return (json.loads((folder / "adapter_config.json").read_text()),
            st_load((folder / "adapter_model.safetensors").read_bytes()))


def _first(tensors, fragment):
    return next(k for k in tensors if fragment in k)


BAD_KIND_CASES = [
    # (id, kind, mutate(config, tensors), message): exact messages, vLLM-style
    ("dora_no_magnitude", "dora", lambda c, t: t.pop(_first(t, "layers.0.self_attn.q_proj.lora_magnitude_vector")),
     "model.layers.0.self_attn.q_proj has no lora_magnitude_vector (use_dora is set)"),
    ("dora_magnitude_shape", "dora", lambda c, t: t.__setitem__(_first(t, "layers.0.self_attn.q_proj.lora_magnitude_vector"),
                                                                torch.ones(3)),
     "shape mismatch at model.layers.0.self_attn.q_proj: lora_magnitude_vector (3,) but the base projection has 64 "
     "outputs"),
    ("dora_rank", "dora", lambda c, t: None, "rank 4 of model.layers.0.mlp.down_proj exceeds max_lora_rank 2"),
    ("ia3_ff_fused", "ia3", lambda c, t: (c.update(feedforward_modules=["down_proj", "up_proj"]),
                                          t.__setitem__(_first(t, "layers.0.mlp.up_proj"), torch.ones(1, 64))),
     "unsupported IA3 feature: feedforward_modules includes up_proj (model.layers.0.mlp.up_proj); its input is "
     "shared inside a fused projection here, only o_proj and down_proj take a feed-forward scale"),
    ("ia3_shape", "ia3", lambda c, t: t.__setitem__(_first(t, "layers.0.self_attn.k_proj"), torch.ones(1, 64)),
     "shape mismatch at model.layers.0.self_attn.k_proj: ia3_l (1, 64) but its output vector [out, 1] is (32, 1) on "
     "the base model"),
    ("ia3_modules_to_save", "ia3", lambda c, t: c.update(modules_to_save=["lm_head"]),
     "unsupported IA3 feature modules_to_save=['lm_head'] (fully trained extra modules)"),
    ("ia3_target", "ia3", lambda c, t: t.__setitem__("base_model.model.lm_head.ia3_l", torch.ones(320, 1)),
     "unsupported IA3 target lm_head; only q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj in decoder "
     "layers"),
    ("ln_target", "ln", lambda c, t: t.__setitem__(
        "base_model.model.model.layers.0.self_attn.q_proj.ln_tuning_layers.weight", torch.ones(64, 64)),
     "unsupported LN_TUNING target q_proj (model.layers.0.self_attn.q_proj); only the RMSNorms input_layernorm, "
     "post_attention_layernorm, norm"),
    ("ln_shape", "ln", lambda c, t: t.__setitem__(_first(t, "model.norm."), torch.ones(32)),
     "shape mismatch at model.norm: weight (32,) but the base norm is (64,)"),
    ("ln_layer", "ln", lambda c, t: t.__setitem__(
        "base_model.model.model.layers.9.input_layernorm.ln_tuning_layers.weight", torch.ones(64)),
     "LN_TUNING targets layer 9 but the base model has 3 layers"),
    ("ln_empty", "ln", lambda c, t: t.clear(), "LN_TUNING adapter matches no modules (no ln_tuning_layers tensors)"),
]


@pytest.mark.parametrize("case,kind,mutate,message", BAD_KIND_CASES, ids=[c[0] for c in BAD_KIND_CASES])
def test_bad_adapters_of_the_new_kinds_are_refused_by_name(qwen, saved, case, kind, mutate, message):
    config, tensors = _files(saved[kind])
    mutate(config, tensors)
    limits = AdapterLimits(max_lora_rank=2) if case == "dora_rank" else AdapterLimits()
    with pytest.raises(AdapterFormatError) as err:
        load_adapter_files(json.dumps(config).encode(), st_save(tensors), read_model_args(qwen),
                           limits)
    assert str(err.value) == message


# ------------------------------------------------------------------------------------ per-row math
ARGS = ModelArgs(architecture="Qwen2ForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FakeBase:
    def __init__(self, gen):
        self.args = ARGS
        self.w = {(layer, n): torch.randn(*ARGS.linear_shape(n), generator=gen) * 0.3
                  for layer in range(2) for n in NAMES}
        self.b = {(layer, n): torch.randn(ARGS.linear_shape(n)[0], generator=gen)
                  for layer in range(2) for n in ("q_proj", "k_proj", "v_proj")}
        self.norms = {(layer, g): 1 + 0.1 * torch.randn(32, generator=gen)
                      for layer in range(2) for g in ("attn_norm", "mlp_norm")} | {(2, "norm"): torch.ones(32)}

    def projection(self, layer, name):
        return self.w[(layer, name)], self.b.get((layer, name))

    def norm(self, layer, group):
        return self.norms[(layer, group)]


def _lora_modules(gen, names, rank, scale):
    return {(layer, n): SimpleNamespace(a=torch.randn(rank, ARGS.linear_shape(n)[1], generator=gen) * 0.3,
                                        b=torch.randn(ARGS.linear_shape(n)[0], rank, generator=gen) * 0.3, scale=scale)
            for layer in range(2) for n in names}


def _adapters(base: FakeBase):
    """slot -> (kind, weights): two LoRA, a DoRA, two IA3 and an LN-tuning adapter."""
    from server.adapters.kinds.dora import DoraWeights
    from server.adapters.kinds.ia3 import Ia3Weights
    from server.adapters.kinds.ln_tuning import LnTuningWeights

    gen = torch.Generator().manual_seed(5)
    dora_mods = _lora_modules(gen, ("q_proj", "v_proj", "down_proj"), 3, 1.5)
    dora = DoraWeights(dora_mods, {k: 1 + torch.rand(ARGS.linear_shape(k[1])[0], generator=gen) for k in dora_mods})
    ia3_keys = [(layer, n) for layer in range(2) for n in ("k_proj", "v_proj", "o_proj", "up_proj", "down_proj")]
    ia3_a = Ia3Weights({k: 1 + 0.5 * torch.randn(ARGS.linear_shape(k[1])[1 if k[1] == "down_proj" else 0],
                                                 generator=gen) for k in ia3_keys},
                       frozenset(k for k in ia3_keys if k[1] == "down_proj"))
    ia3_b = Ia3Weights({k: 1 + 0.5 * torch.randn(ARGS.linear_shape(k[1])[1 if k[1] == "o_proj" else 0],
                                                 generator=gen) for k in ia3_keys if k[1] in ("q_proj", "o_proj")}
                       | {(layer, "q_proj"): 1 + torch.rand(32, generator=gen) for layer in range(2)},
                       frozenset((layer, "o_proj") for layer in range(2)))
    ln = LnTuningWeights({(layer, g): torch.randn(32, generator=gen) for layer in range(2)
                          for g in ("attn_norm", "mlp_norm")} | {(2, "norm"): torch.randn(32, generator=gen)})
    return {0: ("lora", SimpleNamespace(modules=_lora_modules(gen, NAMES, 2, 0.7))),
            1: ("lora", SimpleNamespace(modules=_lora_modules(gen, ("q_proj", "o_proj", "gate_proj"), 4, 2.0))),
            2: ("dora", dora), 3: ("ia3", ia3_a), 4: ("ia3", ia3_b), 5: ("ln", ln)}


def _row_reference(base, adapters, entry, layer, group, x):
    """One row's fused output of `group` by the definitions (x [S, in])."""
    parts = []
    for n in GROUPS[group]:
        w, b = base.projection(layer, n)
        xin = x
        kind, wts = adapters[entry[0][0]] if entry and len(entry) == 1 and entry[0][1] == 1.0 else ("mix", None)
        if kind == "ia3" and (layer, n) in wts.feedforward:
            xin = x * wts.vectors[(layer, n)]
        y = xin @ w.t() + (0 if b is None else b)
        if kind == "mix":
            for slot, weight in entry or []:
                mod = adapters[slot][1].modules.get((layer, n))
                if mod is not None:
                    y = y + weight * mod.scale * (x @ mod.a.t()) @ mod.b.t()
        elif kind == "lora" and (layer, n) in wts.modules:
            mod = wts.modules[(layer, n)]
            y = y + mod.scale * (x @ mod.a.t()) @ mod.b.t()
        elif kind == "dora" and (layer, n) in wts.modules:
            mod = wts.modules[(layer, n)]
            full = w + mod.scale * mod.b @ mod.a
            g = wts.magnitude[(layer, n)] / full.norm(dim=1)
            y = g * (x @ full.t()) + (0 if b is None else b)
        elif kind == "ia3" and (layer, n) in wts.vectors and (layer, n) not in wts.feedforward:
            y = y * wts.vectors[(layer, n)]
        parts.append(y)
    return torch.cat(parts, -1)


# rows' entries: None = base, [(slot, weight), ...]; slots as in _adapters
LAYOUTS = {
    "every kind once, sorted": [None, [(0, 1.0)], [(1, 1.0)], [(2, 1.0)], [(3, 1.0)], [(4, 1.0)], [(5, 1.0)]],
    "two rows each, with base rows": [None, [(2, 1.0)], [(2, 1.0)], [(3, 1.0)], [(3, 1.0)], None, [(5, 1.0)],
                                      [(5, 1.0)]],
    "unsorted": [[(5, 1.0)], [(0, 1.0)], [(3, 1.0)], None, [(2, 1.0)], [(4, 1.0)], [(0, 1.0)]],
    "only IA3 and LN": [[(3, 1.0)], [(4, 1.0)], [(5, 1.0)], None],
    "mixes and weights": [[(0, 1.0)], [(0, 0.5), (1, -1.5)], [(1, 2.0)], [(2, 1.0)], [(0, 1.0), (1, 1.0)], None,
                          [(3, 1.0)]],
}


def _step(base, adapters, entries, seq):
    lora_slots = LoraSlots(ARGS, 6, "cpu", torch.float32, decode_threads=1)
    vectors = VectorSlots(base, 6, "cpu", torch.float32)
    for slot, (kind, w) in adapters.items():
        if kind in ("lora", "dora"):
            lora_slots.load(slot, w.modules)
        if kind != "lora":
            vectors.load(slot, w.row_vectors(base))
    lora_rows = [[(s, wt) for s, wt in (e or []) if adapters[s][0] in ("lora", "dora")] for e in entries]
    if any(len(r) > 1 or any(wt != 1.0 for _, wt in r) for r in lora_rows):
        lora = WeightedLoraBatch(lora_slots, lora_rows, None)
    else:
        lora = LoraBatch(lora_slots, [r[0][0] if r else -1 for r in lora_rows], None)
    vrows = [e[0][0] + 1 if e and len(e) == 1 and adapters[e[0][0]][0] != "lora" else 0 for e in entries]
    own = RowVectorIndex(vectors, torch.tensor(vrows)) if any(vrows) else None
    return AdapterBatch(lora, own, None)


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
@pytest.mark.parametrize("seq", [1, 3])
def test_every_row_gets_exactly_its_own_kind(layout, seq):
    base = FakeBase(torch.Generator().manual_seed(0))
    adapters = _adapters(base)
    entries = LAYOUTS[layout]
    batch = _step(base, adapters, entries, seq)
    for layer in range(ARGS.num_layers):
        for group in GROUPS:
            in_f = ARGS.linear_shape(GROUPS[group][0])[1]
            x = torch.randn(len(entries), seq, in_f)
            w = torch.cat([base.projection(layer, n)[0] for n in GROUPS[group]])
            b = [base.projection(layer, n)[1] for n in GROUPS[group]]
            bias = torch.cat(b) if b[0] is not None else 0
            out = batch.scale_input(layer, group, x) @ w.t() + bias
            batch.apply(layer, group, x, out)
            want = torch.stack([_row_reference(base, adapters, e, layer, group, x[i]) for i, e in enumerate(entries)])
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        for group in ("attn_norm", "mlp_norm"):
            got = batch.norm_weight(layer, group, base.norm(layer, group)).expand(len(entries), 1, 32)
            for i, e in enumerate(entries):
                ln = e is not None and len(e) == 1 and adapters[e[0][0]][0] == "ln"
                want = adapters[5][1].norms[(layer, group)] if ln else base.norm(layer, group)
                assert torch.equal(got[i, 0], want)


def test_steps_without_vector_rows_issue_no_vector_ops():
    base = FakeBase(torch.Generator().manual_seed(0))
    batch = _step(base, _adapters(base), [[(0, 1.0)], None, [(1, 1.0)]], 1)
    assert batch.own is None
    weight = base.norm(0, "attn_norm")
    assert batch.norm_weight(0, "attn_norm", weight) is weight
    x = torch.randn(3, 1, 32)
    assert batch.scale_input(0, "o", x) is x
