"""LangChain's ChatOpenAI against Conduit."""

from __future__ import annotations

import os

from langchain_openai import ChatOpenAI

llm = ChatOpenAI(model=os.environ.get("MODEL", "tiny-llama"), api_key=os.environ["OPENAI_API_KEY"], max_tokens=16,
                 base_url=os.environ.get("CONDUIT_URL", "http://127.0.0.1:8000/v1"))

if __name__ == "__main__":
    print(llm.invoke("Hello").content)
    for piece in llm.stream("Hello"):
        print(piece.content, end="", flush=True)
    print()
