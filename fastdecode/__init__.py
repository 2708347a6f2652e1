"""fastdecode: lossless fast LLM decoding on the machine you have."""
from fastdecode.llm import LLM
from fastdecode.output import Metrics, RequestOutput
from fastdecode.sampling import SamplingParams

__all__ = ["LLM", "Metrics", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
