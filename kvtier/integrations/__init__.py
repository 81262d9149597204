"""Engine adapters: vllm (the KV connector)."""
