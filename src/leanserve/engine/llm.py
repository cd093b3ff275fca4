"""The offline Python API: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..config import EngineConfig, LoRAConfig
from .engine import LLMEngine
from .sequence import Logprob, SamplingParams


@dataclass
class GenerationOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[Logprob] | None


class LLM:
    """Generates for a list of prompts at once; they share every forward pass.

    `model=None` serves the built-in SmolLM2-135M-Instruct; otherwise a Hugging Face folder
    or a .gguf file. Other keyword arguments are `EngineConfig` fields; `lora` may be a dict
    of `LoRAConfig` fields, e.g. `lora={"adapters": {"sql": "/adapters/sql"}}`.
    """

    def __init__(self, model: str | None = None, **config):
        if isinstance(config.get("lora"), dict):
            config["lora"] = LoRAConfig(**config["lora"])
        self.engine = LLMEngine(EngineConfig(model=model, **config))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 adapter: str | list[str | None] | None = None) -> list[GenerationOutput]:
        """`prompts`: a string, a list of token ids, or a list of either. `adapter`: a LoRA
        adapter's name for every prompt, or one per prompt (None: the base model)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        adapters = adapter if isinstance(adapter, list) else [adapter] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        seqs = [self.engine.make_sequence(f"gen-{next(self._ids)}", p, sp, adapter=a)
                for p, sp, a in zip(prompts, params, adapters)]
        results = {s.request_id: GenerationOutput(s.request_id, list(s.token_ids), "", [], "",
                                                  None if s.params.logprobs is None else [])
                   for s in seqs}
        for s in seqs:
            self.engine.add_sequence(s)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                r = results[out.request_id]
                r.text += out.text
                r.token_ids += out.token_ids
                if out.logprobs:
                    r.logprobs += out.logprobs
                if out.finished:
                    r.finish_reason = out.finish_reason
        return [results[s.request_id] for s in seqs]

    def chat(self, messages, params: SamplingParams | list[SamplingParams] | None = None,
             adapter: str | list[str | None] | None = None) -> list[GenerationOutput]:
        """`messages`: one conversation (a list of {"role", "content"}) or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c), add_special_tokens=False)
                   for c in convs]
        return self.generate(prompts, params, adapter)
