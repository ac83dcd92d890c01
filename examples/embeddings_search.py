"""Embeddings for retrieval: embed a few documents through Conduit with the `openai` SDK and with
LangChain's `OpenAIEmbeddings`, then find the document nearest to each query (cosine similarity).

LangChain's `OpenAIEmbeddings` must be built with `check_embedding_ctx_length=False`: by default it
tokenizes with OpenAI's tiktoken vocabulary and sends token ids, which mean other words to any other
model (Conduit refuses them with a 400 saying so).
"""

from __future__ import annotations

import math
import os

from langchain_openai import OpenAIEmbeddings
from openai import OpenAI

URL = os.environ.get("CONDUIT_URL", "http://127.0.0.1:8000/v1")
KEY = os.environ["OPENAI_API_KEY"]
MODEL = os.environ.get("EMBED_MODEL", "tiny-embed")
DOCUMENTS = ["Redis Streams carry jobs from gateways to engines.",
             "vLLM batches the inputs of many requests in one step.",
             "An API key's limits are checked before a job is queued.",
             "Diffusers draws images step by step."]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def main() -> None:
    client = OpenAI(base_url=URL, api_key=KEY)
    answer = client.embeddings.create(model=MODEL, input=DOCUMENTS)  # base64 on the wire, floats here
    vectors = [item.embedding for item in answer.data]
    print(f"{len(vectors)} documents, {len(vectors[0])} dimensions, {answer.usage.prompt_tokens} tokens")

    embedder = OpenAIEmbeddings(model=MODEL, base_url=URL, api_key=KEY, check_embedding_ctx_length=False)
    assert embedder.embed_documents(DOCUMENTS) == vectors  # the same model, the same vectors
    for query in (DOCUMENTS[2], "How are jobs carried to engines?"):
        scores = [cosine(embedder.embed_query(query), v) for v in vectors]
        best = max(range(len(scores)), key=scores.__getitem__)
        print(f"query {query!r}: nearest document {best} ({scores[best]:.3f})")


if __name__ == "__main__":
    main()
