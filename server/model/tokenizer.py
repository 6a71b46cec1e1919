"""Tokenizer wrapper: encode prompts and chats, decode incrementally for streaming."""

from __future__ import annotations

from pathlib import Path

from server.model.config import ModelArgs


class Tokenizer:
    """Thin layer over a transformers fast tokenizer with the few calls the server needs."""

    def __init__(self, hf_tokenizer, eos_token_ids: set[int]):
        self.hf = hf_tokenizer
        self.eos_token_ids = eos_token_ids
        self.vocab_size = len(hf_tokenizer)

    @classmethod
    def from_folder(cls, folder: Path, args: ModelArgs) -> Tokenizer:
        if (folder / "tokenizer.json").is_file():  # the fast path: 0.27 s instead of AutoTokenizer's 1 s
            from transformers import PreTrainedTokenizerFast

            hf = PreTrainedTokenizerFast.from_pretrained(str(folder))
        else:  # e.g. a sentencepiece-only folder
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(folder))
        eos = set(args.eos_token_ids)
        if hf.eos_token_id is not None:
            eos.add(int(hf.eos_token_id))
        gen_cfg = folder / "generation_config.json"
        if gen_cfg.is_file():
            import json

            g = json.loads(gen_cfg.read_text()).get("eos_token_id")
            eos.update(g if isinstance(g, list) else ([g] if g is not None else []))
        return cls(hf, {int(e) for e in eos})

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Render with the tokenizer's chat template plus the generation prompt, then tokenize."""
        if not self.hf.chat_template:
            raise ValueError("messages: this model's tokenizer has no chat template; send a prompt instead")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str:
        """Text of one token for logprob listings (special tokens shown as-is)."""
        return self.hf.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
