"""``POST /v1/embeddings``: OpenAI's embeddings over ``embedding`` jobs (``engines/vllm_embed.py``)."""
