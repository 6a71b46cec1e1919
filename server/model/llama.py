"""A compact Llama-family decoder (Llama, Mistral, Qwen2) over a paged KV cache.

One forward serves a whole batch step: B sequences, each adding 1..S new tokens on top of what
its pages already hold (a prompt at prefill, one token at decode, virtual tokens when a prompt
adapter is precomputed). Rows can carry different LoRA adapters (``lora``) and different KV
prefixes (already written into their pages by the engine). The rotary position of a token is its
index in the sequence's cache, so a prefix of n entries shifts the real tokens to n, n+1, ...
exactly as PEFT's prompt-learning forward does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from server.model import cpu_decode
from server.model.attention import StepPositions, paged_attention, rotary_tables, rotate
from server.model.config import ModelArgs
from server.model.kernel_dispatch import kernel_forward, kernels_wanted
from server.model.linear import Projection, onednn_usable
from server.model.weights import ModelWeights


class AdapterRows(Protocol):
    """One step's per-row adapter hooks (server.adapters.step_batch.AdapterBatch): every adapter kind
    acts through these hooks: at each fused projection ("qkv", "o", "gate_up", "down"), each norm, and each
    sub-layer output ("attn", "mlp") before the residual add."""

    def norm_weight(self, layer: int, group: str, weight: torch.Tensor) -> torch.Tensor:
        """The RMSNorm weight for `group` ("attn_norm", "mlp_norm"; "norm" at layer num_layers):
        `weight` [H] itself, or per row [B, 1, H]."""

    def scale_input(self, layer: int, group: str, x: torch.Tensor) -> torch.Tensor:
        """The input x [B, S, in] of projection `group`, as the projection should see it per row."""

    # True when norm_weight / scale_input / block_output / output scales matter this step; when False the
    # forward calls only `apply` (and the fused-kernel path may take the step).
    row_hooks: bool

    def plain_lora(self):
        """The step's plain LoraBatch when it holds nothing else (a CUDA graph can replay it), else None."""

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Finish the fused projection output out [B, S, out] of `group` of `layer` in place (LoRA
        deltas, output scales); x [B, S, in] is the projection's input before scale_input."""

    def block_output(self, layer: int, site: str, residual: torch.Tensor, out: torch.Tensor) -> None:
        """Finish the output out [B, S, H] of sub-layer `site` ("attn", "mlp") of `layer` in place, just
        before it is added to the residual stream `residual` [B, S, H] (bottleneck adapters)."""



@dataclass
class StepInput:
    """What one forward call processes; every tensor is on the model's device."""

    start: torch.Tensor  # [B] int64: cache index of each row's first new token
    lengths: torch.Tensor  # [B] int64: new tokens per row (1..S); padding beyond is ignored
    block_tables: torch.Tensor  # [B, P] int64: page ids of each row (padded with any valid page)
    input_ids: torch.Tensor | None = None  # [B, S] int64
    input_embeds: torch.Tensor | None = None  # [B, S, hidden]
    lora: AdapterRows | None = None  # per-row adapter math; None = every row is the base model


class PagedKVCache:
    """Fixed-size K/V storage: per layer [num_pages * page_size, H_kv, D]; pages are handed out by the engine."""

    def __init__(self, args: ModelArgs, num_pages: int, page_size: int, dtype: torch.dtype, device: str):
        self.page_size = page_size
        self.num_pages = num_pages
        # One row past the last page, never handed out and never written: every read of a position a row
        # does not own (padding, entries not yet written) is pointed here, so whatever an earlier request
        # left in a page (even NaN or inf) can never reach another request's attention.
        self.null_slot = num_pages * page_size
        # And one more: a prefill chunk's padding positions are written there, never read.
        self.scratch_slot = num_pages * page_size + 1
        shape = (num_pages * page_size + 2, args.num_kv_heads, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_layers)]

    def slots(self, block_tables: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Flat slot of cache index `index` [B, T] for rows with `block_tables` [B, P] -> [B, T]."""
        page = torch.gather(block_tables, 1, torch.div(index, self.page_size, rounding_mode="floor"))
        return page * self.page_size + index % self.page_size

    def write_prefix(self, layer_keys: torch.Tensor, layer_values: torch.Tensor, slots: torch.Tensor) -> None:
        """Copy a prefix [L, H_kv, n, D] into flat `slots` [n] of every layer."""
        for layer in range(len(self.k)):
            self.k[layer][slots] = layer_keys[layer].transpose(0, 1).to(self.k[layer].dtype)  # [n, H_kv, D]
            self.v[layer][slots] = layer_values[layer].transpose(0, 1).to(self.v[layer].dtype)

    def copy_page(self, src: int, dst: int) -> None:
        """Copy page `src`'s K/V entries into page `dst` in every layer (a forked sample's own copy of the
        partial page it would otherwise write into while another sequence reads it)."""
        s, d, n = src * self.page_size, dst * self.page_size, self.page_size
        for cache in (*self.k, *self.v):
            cache[d:d + n] = cache[s:s + n]  # [P, H_kv, D]

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [L, H_kv, n, D] at flat `slots` [n] (used to capture a prompt adapter's prefix)."""
        k = torch.stack([c[slots].transpose(0, 1) for c in self.k])
        v = torch.stack([c[slots].transpose(0, 1) for c in self.v])
        return k, v


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 like transformers, returned in x's dtype, times `weight` in x's dtype.

    torch's rms_norm without a weight is transformers' x * rsqrt(mean(x^2) + eps) in float32, op for op
    (bit-identical: tests/model/test_layers.py), in one call instead of six."""
    return weight * F.rms_norm(x, (x.shape[-1],), None, eps)


class LlamaRuntime:
    """The forward pass. Weights are frozen tensors; merge-on-load edits them in place (see adapters)."""

    def __init__(self, args: ModelArgs, weights: ModelWeights, device: str, dtype: torch.dtype,
                 matmul: str = "onednn", kernels: str = "auto", cuda_graphs: str = "on"):
        self.args = args
        # Triton kernels on CUDA ("auto"), or forced ("triton": CPU runs them in the interpreter).
        self.use_kernels = kernels_wanted(kernels, device)
        self.graphs = None  # CUDA-graph decode runner (CUDA with the kernels and --cuda-graphs on)
        self._fp32_logits_mm = True
        self.use_onednn = matmul == "onednn" and onednn_usable(device, dtype)
        # Our CPU kernels (server.model.cpu_decode) in the default mode, float32: built here, at start.
        self.use_cpu_kernels = not self.use_kernels and cpu_decode.wanted(device, dtype, self.use_onednn)
        self.w = weights
        self.device = device
        self.dtype = dtype
        d = args.head_dim
        # sin_rot: rotate-half's signs folded in (the torch path); sin: plain (the fused kernels).
        self.cos, self.sin_rot = rotary_tables(d, args.rope_theta, args.max_position_embeddings + 1024, device, dtype)
        half = d // 2
        self.sin = torch.cat((-self.sin_rot[:, :half], self.sin_rot[:, half:]), dim=-1)  # [P, D]
        q, kv = args.num_heads * d, args.num_kv_heads * d
        self.qkv_slices = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
        inter = args.intermediate_size
        self.gate_up_slices = {"gate_proj": slice(0, inter), "up_proj": slice(inter, 2 * inter)}
        self.proj = [self._layer_projections(layer) for layer in weights.layers]
        self.lm_head = Projection(weights.lm_head, use_onednn=self.use_onednn, cpu_gemv=self.use_cpu_kernels)
        if cuda_graphs == "on" and self.use_kernels and str(device).startswith("cuda"):
            from server.model.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self)

    def _layer_projections(self, layer) -> dict[str, Projection]:
        fast, gemv = self.use_onednn, self.use_cpu_kernels
        return {"qkv": Projection(layer.wqkv, layer.bqkv, fast, gemv), "o": Projection(layer.wo, layer.bo, fast, gemv),
                "gate_up": Projection(layer.w_gate_up, None, fast, gemv), "down": Projection(layer.w_down, None, fast, gemv)}

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head over final-normed hidden states h [..., H] -> float32 logits [..., V]; on CUDA in
        bf16/fp16 the matmul writes float32 directly (no rounding of the logits to 16 bits)."""
        if h.is_cuda and h.dtype != torch.float32 and self._fp32_logits_mm:
            try:
                flat = h.reshape(-1, h.shape[-1])  # [N, H]
                return torch.mm(flat, self.w.lm_head.t(), out_dtype=torch.float32).view(*h.shape[:-1], -1)
            except RuntimeError:  # a torch/GPU without mm(out_dtype=): round through the model dtype
                self._fp32_logits_mm = False
        return self.lm_head(h).float()

    def refresh_layer(self, index: int) -> None:
        """Call after editing a layer's dense weights in place (merge-on-load / unmerge)."""
        for proj in self.proj[index].values():
            proj.refresh()

    def fused_rows(self, layer: int, name: str) -> tuple[torch.Tensor, slice]:
        """The dense weight [out_fused, in] holding projection `name` ("q_proj", ...) of `layer`, and its rows there."""
        lw = self.w.layers[layer]
        if name in self.qkv_slices:
            return lw.wqkv, self.qkv_slices[name]
        if name in self.gate_up_slices:
            return lw.w_gate_up, self.gate_up_slices[name]
        return (lw.wo if name == "o_proj" else lw.w_down), slice(None)

    def add_deltas(self, deltas: dict[tuple[int, str], torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
        """Add each delta [out, in] to projection (layer, name); return the original rows for restore_rows.

        All or nothing: if any sum is non-finite, raise ValueError before any weight changes.
        """
        updated = {}
        for (layer, name), delta in deltas.items():
            weight, rows = self.fused_rows(layer, name)
            new = weight[rows] + delta.to(weight.dtype)  # [out, in]
            if not bool(torch.isfinite(new).all()):
                raise ValueError(f"layer {layer} {name}: the merged weight would hold NaN or inf")
            updated[(layer, name)] = new
        originals = {}
        for (layer, name), new in updated.items():
            weight, rows = self.fused_rows(layer, name)
            originals[(layer, name)] = weight[rows].clone()
            weight[rows] = new
        for layer in {layer for layer, _ in updated}:
            self.refresh_layer(layer)
        return originals

    def restore_rows(self, originals: dict[tuple[int, str], torch.Tensor]) -> None:
        """Put back the rows add_deltas returned, bit for bit."""
        for (layer, name), rows_before in originals.items():
            weight, rows = self.fused_rows(layer, name)
            weight[rows] = rows_before
        for layer in {layer for layer, _ in originals}:
            self.refresh_layer(layer)

    @torch.inference_mode()
    def forward(self, step: StepInput, cache: PagedKVCache, all_logits: bool = False) -> torch.Tensor:
        """Run one batch step; return logits [B, V] (float32) at each row's last new token,
        or [B, S, V] for every position when `all_logits`."""
        # The CUDA path: fused Triton kernels, decode steps replayed as CUDA graphs. Steps with per-row
        # norm weights or scales (IA3, LN tuning, DoRA rows) take the torch path.
        if self.use_kernels and (step.lora is None or not step.lora.row_hooks):
            if self.graphs is not None and not all_logits and self.graphs.can_run(step, cache):
                return self.graphs.run(step, cache)
            return kernel_forward(self, step, cache, all_logits)
        if cpu_decode.decode_step(self, step, cache):  # CPU float32 decode steps: our fused kernels
            return self.forward_layers(step, cpu_decode.CpuKernelOps(self, step, cache), all_logits)
        return self.forward_layers(step, TorchOps(self, step, cache), all_logits)

    def forward_layers(self, step: StepInput, ops: StepOps, all_logits: bool = False) -> torch.Tensor:
        """The layer structure every path shares; `ops` does the attention and the (residual add +) norms:
        TorchOps here, server.model.kernel_forward.KernelOps on the fused Triton kernels,
        server.model.cpu_decode.CpuKernelOps on our CPU kernels (decode steps)."""
        a, w = self.args, self.w
        x = w.embed[step.input_ids] if step.input_embeds is None else step.input_embeds.to(self.dtype)  # [B, S, H]
        lora = step.lora
        # Per-row norm weights, input scales and block outputs only where the step has such rows (IA3, LN
        # tuning, DoRA, bottleneck): plain LoRA steps and the kernel path skip those hooks (identities there).
        hooks = lora if lora is not None and lora.row_hooks else None
        norm_w = w.layers[0].attn_norm if hooks is None else hooks.norm_weight(0, "attn_norm", w.layers[0].attn_norm)
        _, h = ops.add_norm(x, None, norm_w)  # [B, S, H]: the first layer's input
        last_layer = len(w.layers) - 1
        for i, layer in enumerate(w.layers):
            proj = self.proj[i]
            qkv = proj["qkv"](h if hooks is None else hooks.scale_input(i, "qkv", h))  # [B, S, q + 2kv]
            if lora is not None:
                lora.apply(i, "qkv", h, qkv)
            attn = ops.attention(i, qkv)  # [B, S, H*D]
            out = proj["o"](attn if hooks is None else hooks.scale_input(i, "o", attn))
            if lora is not None:
                lora.apply(i, "o", attn, out)
            if hooks is not None:
                hooks.block_output(i, "attn", x, out)
            norm_w = layer.mlp_norm if hooks is None else hooks.norm_weight(i, "mlp_norm", layer.mlp_norm)
            x, h = ops.add_norm(x, out, norm_w)  # x + out, and its norm
            gate_up = proj["gate_up"](h if hooks is None else hooks.scale_input(i, "gate_up", h))  # [B, S, 2*inter]
            if lora is not None:
                lora.apply(i, "gate_up", h, gate_up)
            act = ops.mlp_act(gate_up)  # [B, S, inter]
            down = proj["down"](act if hooks is None else hooks.scale_input(i, "down", act))
            if lora is not None:
                lora.apply(i, "down", act, down)
            if hooks is not None:
                hooks.block_output(i, "mlp", x, down)
            if i < last_layer:  # h: the next layer's input
                norm_w = w.layers[i + 1].attn_norm
                norm_w = norm_w if hooks is None else hooks.norm_weight(i + 1, "attn_norm", norm_w)
            else:  # h: the final norm, over each row's last new token only unless all_logits
                norm_w = w.norm if hooks is None else hooks.norm_weight(a.num_layers, "norm", w.norm)  # [H] or [B, 1, H]
                if not all_logits:
                    last = (torch.arange(x.shape[0], device=x.device), step.lengths - 1)
                    x, down = x[last][:, None], down[last][:, None]  # [B, 1, H]
            x, h = ops.add_norm(x, down, norm_w)
        return self.logits(h if all_logits else h[:, 0])  # [B, S, V] or [B, V]


class StepOps(Protocol):
    """What differs between the torch path and the fused-kernel path inside one step's layers."""

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None,
                 weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, RMSNorm of it with `weight` [H] or [B, 1, H]) for x, delta [B, S, H]; delta None: (x, norm(x))."""

    def attention(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """Rotate the new tokens' q/k of qkv [B, S, q + 2kv], write k/v into the pages of `layer`,
        attend over each row's pages -> [B, S, H*D]."""

    def mlp_act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up for gate_up [B, S, 2*inter] (gate first) -> [B, S, inter]."""


class TorchOps:
    """The CPU path (server.model.attention): K/V gathered into a contiguous copy per layer, then SDPA;
    torch RMSNorm. What the layers share is built once per step (StepPositions)."""

    def __init__(self, rt: LlamaRuntime, step: StepInput, cache: PagedKVCache):
        self.rt, self.cache = rt, cache
        self.eps = rt.args.rms_norm_eps
        self.pos = StepPositions.build(step, cache, rt.cos, rt.sin_rot)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None,
                 weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x if delta is None else x + delta
        return x, rms_norm(x, weight, self.eps)

    def attention(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        a = self.rt.args
        nq, nkv = a.num_heads, a.num_kv_heads
        heads = qkv.view(*qkv.shape[:2], nq + 2 * nkv, a.head_dim)  # [B, S, H + 2Hkv, D]
        qk = rotate(heads[:, :, :nq + nkv], self.pos.cos, self.pos.sin)  # [B, S, H + Hkv, D]: q and k at once
        return paged_attention(layer, qk[:, :, :nq], qk[:, :, nq:], heads[:, :, nq + nkv:], self.cache,
                               self.pos)  # [B, S, H*D]

    def mlp_act(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_mul(gate_up)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [..., 2*inter] (gate first) -> [..., inter], torch ops."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
