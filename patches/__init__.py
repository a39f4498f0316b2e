"""What vllm-kvshield cannot do through vLLM's plugin API (installed as vllm_kvshield.patches; see README.md)."""
