"""bench/gpu_check's CPU smoke mode: model building, the transformers/PEFT checks (LoRA, prompt and prefix
tuning), the sampling kernel check under the interpreter, and the table run."""

from __future__ import annotations

from bench.gpu_check import main
from server.kernels.runtime import kernels_available


def test_gpu_check_smoke_run_on_cpu(capsys):
    rows = main(["--device", "cpu", "--tiny", "--adapters", "0,3", "--steps", "2"])
    found = {(r.section, r.item): r.value for r in rows}
    assert found[("vs transformers", "greedy tokens equal (rows)")] == "4/4"
    assert found[("vs PEFT", "mixed LoRA batch: greedy tokens equal")] == "4/4"
    assert float(found[("vs PEFT", "mixed LoRA batch: logits max |diff|")]) < 1e-4
    for kind in ("prompt tuning", "prefix tuning"):  # PEFT's adapters, read by our loader, served as KV prefixes
        assert found[("vs PEFT", f"{kind}: greedy tokens equal")] == "2/2"
        assert float(found[("vs PEFT", f"{kind}: logits max |diff|")]) < 1e-4
    if kernels_available("cpu"):  # triton installed (the gpu-test extra): the kernel under the interpreter
        assert found[("kernels", "sampling: tokens equal to the torch draw")] == "4/4"
    assert any(r.item.startswith("3 LoRA, graphs off, 4 concurrent") for r in rows)
    assert "| vs PEFT | tiny |" in capsys.readouterr().out
