"""spillover: run LLMs bigger than your GPU, fast, behind an OpenAI-compatible API."""

from spillover.engine.params import RequestOutput, SamplingParams
from spillover.llm import LLM

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
