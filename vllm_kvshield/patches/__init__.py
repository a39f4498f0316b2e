"""What vllm-kvshield cannot do through vLLM's plugin API (the package vllm_kvshield.patches; see README.md)."""
