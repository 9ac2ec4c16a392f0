"""spillover: run LLMs bigger than your GPU, fast, behind an OpenAI-compatible API."""

from spillover.engine.llm import LLM
from spillover.engine.sampling import RequestOutput, SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
