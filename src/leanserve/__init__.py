"""leanserve: LLM serving for real-time AI, with a bill on every response."""
from .config import EngineConfig
from .engine.llm import LLM, GenerationOutput
from .engine.sequence import Logprob, SamplingParams

__all__ = ["LLM", "GenerationOutput", "SamplingParams", "Logprob", "EngineConfig"]
__version__ = "0.1.0"
