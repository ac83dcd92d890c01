"""The official `openai` SDK against Conduit: chat, streaming, JSON schema output, tools."""

from __future__ import annotations

import json
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("CONDUIT_URL", "http://127.0.0.1:8000/v1"), api_key=os.environ["OPENAI_API_KEY"])
MODEL = os.environ.get("MODEL", "tiny-llama")


def main() -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=16)
    print(r.choices[0].message.content, r.usage)

    for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=16, stream=True, stream_options={"include_usage": True}):
        print(chunk.choices[0].delta.content if chunk.choices else chunk.usage, flush=True)

    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A person, as JSON."}], max_tokens=100,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    print(json.loads(r.choices[0].message.content or "{}"))

    tool = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"}},
        "required": ["city"], "additionalProperties": False}}}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                       tools=[tool], max_tokens=60,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    print(r.choices[0].message.tool_calls)


if __name__ == "__main__":
    main()
