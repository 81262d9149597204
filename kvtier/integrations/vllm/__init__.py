"""kvtier as a vLLM V1 KV connector (``kv_connector_module_path="kvtier.integrations.vllm"``).

Importing this package imports vLLM; ``import kvtier`` alone never does.
"""
from .connector import KVTierConnector

__all__ = ["KVTierConnector"]
