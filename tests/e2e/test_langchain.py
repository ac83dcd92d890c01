"""LangChain's ChatOpenAI (and its legacy OpenAI LLM) against the stack."""

from __future__ import annotations

from langchain_openai import ChatOpenAI, OpenAI

from tests.e2e.conftest import MODEL, VllmStack


def test_chat_openai_invoke_and_stream(vllm_stack: VllmStack) -> None:
    llm = ChatOpenAI(model=MODEL, base_url=f"{vllm_stack.base_url}/v1", api_key="unused", max_tokens=8,
                     max_retries=0, stream_usage=True)
    msg = llm.invoke("Hello there")
    assert isinstance(msg.content, str) and msg.content
    assert msg.usage_metadata is not None and msg.usage_metadata["output_tokens"] <= 8
    pieces = list(llm.stream("Hello there"))
    assert "".join(str(p.content) for p in pieces)
    usage = [p.usage_metadata for p in pieces if p.usage_metadata]
    assert usage and usage[-1]["total_tokens"] == usage[-1]["input_tokens"] + usage[-1]["output_tokens"]


def test_legacy_openai_llm(vllm_stack: VllmStack) -> None:
    llm = OpenAI(model=MODEL, base_url=f"{vllm_stack.base_url}/v1", api_key="unused", max_tokens=5, max_retries=0)
    assert isinstance(llm.invoke("Once upon a time"), str)
