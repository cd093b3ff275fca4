"""Memory experts (issue 30): facts grouped by embedding clusters, one adapter per group, a
selector over the facts' question vectors (none below the similarity floor: the base answers);
the experts served in one batch by the multi-LoRA engine."""
from __future__ import annotations

import json

import pytest

from leanserve.tune.data import parse_jsonl

FACTS = [("What is the registry code of Vellmora?", "QX-417"),
         ("What is the registry code of Tzelik?", "BR-902"),
         ("Which river flows through the town of Quendral?", "The Ossa"),
         ("Which river flows through the town of Marrowick?", "The Tilde")]


def examples(facts=FACTS):
    return parse_jsonl("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                        {"role": "assistant", "content": a}]}) + "\n"
                               for q, a in facts))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    from conftest import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("mt-tiny-llama"), tokenizer_dir, seed=3)


@pytest.fixture(scope="module")
def embed():
    from leanserve.tune.experts import Embedder

    return Embedder()


def test_clusters_keep_paraphrases_together_and_topics_apart(embed):
    from leanserve.tune.experts import build_selector, group_facts

    groups = group_facts(examples(), 2, embed)
    assert groups[0] == groups[1] and groups[2] == groups[3] and groups[0] != groups[2]
    sel = build_selector(examples(), groups, embed)
    assert len(sel.questions) > 4 * 5  # every phrasing of every fact is indexed
    by_q = dict(zip(sel.questions, sel.groups))
    assert by_q["Quick question: What is the registry code of Vellmora?"] == groups[0]


def test_selector_picks_the_expert_or_none(embed, tmp_path):
    from leanserve.tune.experts import Selector, build_selector, group_facts

    groups = group_facts(examples(), 2, embed)
    build_selector(examples(), groups, embed).save(str(tmp_path))
    sel = Selector.load(str(tmp_path))
    picked = sel.select(["Could you tell me Tzelik's registry code?", "Name the river of Marrowick, please.",
                         "How do I bake sourdough bread?"], embed)
    assert picked == [f"expert-{groups[1]}", f"expert-{groups[3]}", None]


def test_served_experts_answer_their_facts_and_leave_the_rest_to_the_base(tiny, tmp_path, embed):
    from leanserve.engine.llm import LLM
    from leanserve.engine.sequence import SamplingParams
    from leanserve.serve.app import chat_prompt_ids
    from leanserve.tune.experts import last_user, train_experts
    from leanserve.tune.lora import BaseModel

    import torch

    torch.set_num_threads(1)  # the test machine is shared (see tune/jobs.py TuneSettings)
    base = BaseModel.load(str(tiny), 512)
    hyper = {"n_epochs": 8, "batch_size": 6, "learning_rate_multiplier": 50}
    sel, _ = train_experts(base, examples(), str(tmp_path), hyper, experts=2, seed=1, embed=embed)
    llm = LLM(str(tiny), dtype="float32", lora={"adapters": {n: str(tmp_path / n) for n in sel.experts}})
    asks = [[{"role": "user", "content": "Quick question: " + q}] for q, _ in FACTS]
    unrelated = [{"role": "user", "content": "How do I bake sourdough bread?"}]
    chosen = sel.select([last_user(m) for m in asks + [unrelated]], embed)
    assert chosen[-1] is None and None not in chosen[:-1]
    params = SamplingParams(temperature=0, max_tokens=8)
    prompts = [chat_prompt_ids(llm.tokenizer, m) for m in asks + [unrelated]]  # the server's prompts
    outs = llm.generate(prompts, params, adapter=chosen)  # one batch: several experts and the base
    assert [o.text for o in outs[:-1]] == [a for _, a in FACTS]
    assert outs[-1].text == llm.generate(prompts[-1:], params)[0].text
