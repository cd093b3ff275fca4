"""leanserve: LLM serving for real-time AI, with a bill on every response."""
import os

# Transparent huge pages for torch's large CPU buffers (the KV pool, the weights, the step's
# activations): each decode step reads hundreds of MB scattered over the KV pool, and with
# 4 KiB pages much of that time went to TLB misses (one 128-sequence wave: +6% tok/s;
# BENCHMARKS.md). torch reads this once, at its first allocation, so it only takes effect
# when leanserve is imported before torch (the CLI and the server always are; a program
# that imports torch first can set the variable itself). `THP_MEM_ALLOC_ENABLE=0` in the
# environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .config import EngineConfig  # noqa: E402
from .engine.llm import LLM, GenerationOutput  # noqa: E402
from .engine.sequence import Logprob, SamplingParams  # noqa: E402
from .engine.structured import Constraint  # noqa: E402

__all__ = ["LLM", "GenerationOutput", "SamplingParams", "Logprob", "EngineConfig", "Constraint"]
__version__ = "0.1.0"
