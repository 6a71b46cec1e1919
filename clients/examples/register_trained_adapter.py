"""Register a freshly trained adapter folder (e.g. from ``adapterserve-train``) and try it.

    adapterserve-train ... --output runs/support-lora        # writes a PEFT folder
    python -m clients.examples.register_trained_adapter runs/support-lora --id support "How do I reset my password?"

The folder's adapter_config.json and adapter_model.safetensors are uploaded inline, so the
server needs no access to this machine's disk. With ``--admin-token`` on the server, pass
the admin token as ``--token``.
"""

from __future__ import annotations

import argparse
import os

from clients import AdapterServeClient


def main() -> None:
    """Upload the folder, show what the server made of it, and compare against the base model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="PEFT save_pretrained folder")
    p.add_argument("prompt")
    p.add_argument("--id", required=True, help="adapter id to register under")
    p.add_argument("--pin", action="store_true")
    p.add_argument("--target", default=os.environ.get("ADAPTERSERVE_TARGET", "127.0.0.1:50051"))
    p.add_argument("--token", default=os.environ.get("ADAPTERSERVE_TOKEN"))
    a = p.parse_args()

    with AdapterServeClient(a.target, token=a.token) as client:
        info = client.register_adapter(a.id, local_dir=a.folder, replace=True, pin=a.pin)
        print(f"registered {info.adapter_id}: {info.type}, rank {info.rank}, "
              f"{info.num_virtual_tokens} virtual tokens, {info.size_bytes} bytes, loaded in {info.load_ms:.0f} ms")
        messages = [{"role": "user", "content": a.prompt}]
        for adapter in (None, a.id):
            result = client.generate(messages=messages, adapter=adapter, max_new_tokens=64)
            print(f"\n--- {adapter or '(base)'}:\n{result.text}")


if __name__ == "__main__":
    main()
