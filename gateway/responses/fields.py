"""What the gateway does with each thing a ``POST /v1/responses`` request can ask for.

One key per thing OpenAI's ``CreateResponse`` lets a client set (the key syntax is in
``tests/responses_fields.py``, which derives the keys from OpenAI's spec; a test fails when
the spec has a thing this table does not decide, or the table names one the spec lacks) and
what happens to it: honoured (done as OpenAI documents it), ignored (accepted, nothing done,
and why that is harmless) or refused (a 400 whose ``param`` names it). A ``null`` is always
the same as leaving the field out. ``openapi/responses-fields.md`` is this table, rendered.
"""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    """What a request that sets a thing gets."""

    HONOURED = "honoured"
    IGNORED = "ignored"
    REFUSED = "refused"


H, I, R = Outcome.HONOURED, Outcome.IGNORED, Outcome.REFUSED

_FIELDS_BELOW = "Decided field by field below."
_NO_CACHE_SETTINGS = (
    "vLLM's prefix caching is automatic: every shared prompt prefix is reused while memory allows, "
    "with no keys, lifetimes or breakpoints to set."
)
_ONE_TIER = "There is one service tier: every request is served alike."
_PART_OF = "Part of `{}`, which is refused."
_HOSTED_TOOL = "A hosted tool ({}), which this server does not run."
_HOSTED_CHOICE = "Names a hosted tool, and hosted tools are refused."
_HOSTED_ITEM = "An item of a tool this server does not run ({}): such tools are refused, so there is no call to replay."
_HOSTED_INCLUDE = "Nothing to include: that hosted tool is refused, so its items never appear."
_NOT_STORED_ID = "Item ids are not kept: nothing is stored that could be referenced by one."
_REPLAY_STATUS = "The status of a replayed item does not change the prompt."
_NAMESPACE = "Namespaced tools are refused, so a call into one cannot be replayed."
_CALLER = (
    "Who made a call does not change the prompt; calls made by programs come with `program` items, which are "
    "refused."
)

FIELDS: dict[str, tuple[Outcome, str]] = {
    # ---- top-level properties (a boolean's or an enum's values apart) ----
    "metadata": (H, ("Checked (at most 16 pairs, keys of at most 64 characters, values of at most 512) and echoed back"
                     " on the response.")),
    "top_logprobs": (H, ("Passed on as chat's `top_logprobs`; the alternatives come back on `output_text` parts when "
                         "`include` has `message.output_text.logprobs`.")),
    "temperature": (H, "Passed on as chat's `temperature`."),
    "top_p": (H, "Passed on as chat's `top_p`."),
    "user": (H, "Passed on as chat's `user`."),
    "safety_identifier": (I, "There is no abuse monitoring here for it to identify a user to."),
    "prompt_cache_key": (I, _NO_CACHE_SETTINGS),
    "prompt_cache_retention=in_memory": (I, _NO_CACHE_SETTINGS),
    "prompt_cache_retention=24h": (I, _NO_CACHE_SETTINGS),
    "prompt_cache_options": (I, _NO_CACHE_SETTINGS),
    "prompt_cache_options.ttl": (I, _NO_CACHE_SETTINGS),
    "prompt_cache_options.mode": (I, _NO_CACHE_SETTINGS),
    "previous_response_id": (H, ("The stored response (the same API key's, within `response_ttl_s`) is continued on "
                                 "any gateway replica: its input items, then its output items, come before `input`; "
                                 "its `instructions` are not carried over (OpenAI's rule). An id unknown, expired, "
                                 "deleted, another key's or stored with `store: false` is a 400 "
                                 "`previous_response_not_found`.")),
    "model": (H, "The model whose engines serve the chat job, as for chat completions."),
    "background=true": (H, ("Answered `queued` at once; its job runs through the queue (limits, fair queueing, run "
                            "again on another engine when its engine dies) and its events go to a result record any "
                            "replica reads: `GET` polls it, `GET ?stream=true&starting_after=n` resumes its stream, "
                            "`POST .../cancel` cancels it; it completes even if the gateway that accepted it dies. "
                            "With `stream`: its events from that record. Needs `store` true (400 otherwise).")),
    "background=false": (H, "The default: the response is answered on the request's own connection."),
    "max_tool_calls": (I, "It limits calls to built-in tools, and no built-in tool runs here (they are refused)."),
    "text": (H, _FIELDS_BELOW),
    "text.format": (H, "Passed on as chat's `response_format` (by type below)."),
    "text.verbosity": (I, "Open models' sampling has no verbosity setting."),
    "tools": (H, "Function tools are passed on as chat's `tools`; every other type is refused (by type below)."),
    "tool_choice": (H, "Decided variant by variant below."),
    "prompt": (R, "Stored prompt templates are not kept here: send the prompt itself in `instructions` and `input`."),
    "prompt.id": (R, _PART_OF.format("prompt")),
    "prompt.version": (R, _PART_OF.format("prompt")),
    "prompt.variables": (R, _PART_OF.format("prompt")),
    "service_tier=auto": (I, _ONE_TIER),
    "service_tier=default": (I, _ONE_TIER),
    "service_tier=flex": (I, _ONE_TIER),
    "service_tier=scale": (I, _ONE_TIER),
    "service_tier=priority": (I, _ONE_TIER),
    "service_tier=fast": (I, _ONE_TIER),
    "service_tier=ultrafast": (I, _ONE_TIER),
    "truncation=auto": (R, ("The start of a conversation is never dropped to make it fit: send input that fits the "
                            "model's context.")),
    "truncation=disabled": (H, "The default: input longer than the model's context is a 400."),
    "reasoning": (H, _FIELDS_BELOW),
    "reasoning.mode": (I, ("OpenAI's execution modes (`standard`, `pro`) have no counterpart: a model reasons as its "
                           "chat template has it.")),
    "reasoning.effort": (H, ("Passed on as chat's `reasoning_effort`, which a model's chat template reads where it "
                             "supports it (`none` turns thinking off where the template has `enable_thinking`).")),
    "reasoning.summary": (I, ("No summariser runs: a model's reasoning comes back as a reasoning item's text where the"
                              " model emits it.")),
    "reasoning.context": (I, ("Replayed reasoning is always dropped from the prompt (OpenAI's `current_turn`), as chat"
                              " templates drop past reasoning.")),
    "reasoning.generate_summary": (I, "The deprecated spelling of `summary`: no summariser runs."),
    "input": (H, "A string (one user message) or items, translated into chat messages (by type below)."),
    "include": (H, "Decided value by value below."),
    "parallel_tool_calls=true": (H, "Passed on as chat's `parallel_tool_calls` (the default)."),
    "parallel_tool_calls=false": (H, "Passed on as chat's `parallel_tool_calls`: at most one tool call a response."),
    "store=true": (H, ("The default: once answered (streamed: at its last event; completed or incomplete, never "
                       "failed) the response is kept with its input items for `response_ttl_s` (30 days), for "
                       "`GET`/`DELETE /v1/responses/{id}`, its `input_items` and `previous_response_id`: a record "
                       "of at most `response_max_record_bytes` (larger: answered, not kept), while its API key "
                       "holds under `response_max_stored_bytes` and all keys under `response_store_max_bytes` "
                       "(else a 400 `response_store_full` before it runs: delete stored responses, or send "
                       "`store: false`).")),
    "store=false": (H, "Nothing is kept, as asked: the response can be neither retrieved nor continued."),
    "instructions": (H, "Sent first, as a system message."),
    "moderation": (R, "No moderation runs here: a moderation model set here would promise checks that never happen."),
    "moderation.model": (R, _PART_OF.format("moderation")),
    "moderation.policy": (R, _PART_OF.format("moderation")),
    "stream=true": (H, ("Server-sent events, from `response.created` to one terminal event, each with its "
                        "`sequence_number`.")),
    "stream=false": (H, "One `Response` object (the default)."),
    "stream_options": (I, "Its only field, `include_obfuscation`, is ignored."),
    "stream_options.include_obfuscation": (I, ("No obfuscation padding is sent (the stream is never padded), so there "
                                               "is none to turn off, and asking for it adds none.")),
    "conversation": (R, ("Conversations (the Conversations API) are not kept: continue a stored response with "
                         "`previous_response_id`, or send the whole conversation in `input`.")),
    "conversation.id": (R, _PART_OF.format("conversation")),
    "context_management": (R, "Compaction is not done here: send input that fits the model's context."),
    "context_management.type": (R, _PART_OF.format("context_management")),
    "context_management.compact_threshold": (R, _PART_OF.format("context_management")),
    "max_output_tokens": (H, ("Passed on as chat's `max_completion_tokens`; a response cut there ends `incomplete` "
                              "(`max_output_tokens`).")),
    # ---- text.format, by type ----
    "text.format[type=text]": (H, "Plain text: chat's `response_format` `text`."),
    "text.format[type=json_schema]": (H, ("Passed on as chat's `response_format` `json_schema` (name, schema, strict):"
                                          " the output is constrained to the schema.")),
    "text.format[type=json_object]": (H, ("Passed on as chat's `response_format` `json_object`: the output is "
                                          "constrained to JSON.")),
    # ---- tools, by type ----
    "tools[type=function]": (H, "Passed on as a chat function tool."),
    "tools[type=function].name": (H, "The chat tool's `function.name`."),
    "tools[type=function].description": (H, "The chat tool's `function.description`."),
    "tools[type=function].parameters": (H, "The chat tool's `function.parameters`: the JSON Schema of the arguments."),
    "tools[type=function].output_schema": (I, ("It describes what the client's function returns, and chat tools have "
                                               "no place for that.")),
    "tools[type=function].strict": (H, ("The chat tool's `function.strict`: vLLM constrains the arguments to the "
                                        "schema with `tool_choice` required or named, and with `auto` where its tool "
                                        "parser supports strict calling.")),
    "tools[type=function].defer_loading": (I, ("Every tool is given to the model up front: deferred loading needs "
                                               "`tools[type=tool_search]`, which is refused.")),
    "tools[type=function].allowed_callers": (I, "Every call is a direct one: programmatic tool calling is refused."),
    "tools[type=file_search]": (R, _HOSTED_TOOL.format("vector store search")),
    "tools[type=computer]": (R, _HOSTED_TOOL.format("computer use")),
    "tools[type=computer_use_preview]": (R, _HOSTED_TOOL.format("computer use")),
    "tools[type=web_search]": (R, _HOSTED_TOOL.format("web search")),
    "tools[type=web_search_2025_08_26]": (R, _HOSTED_TOOL.format("web search")),
    "tools[type=mcp]": (R, _HOSTED_TOOL.format("remote MCP servers")),
    "tools[type=code_interpreter]": (R, _HOSTED_TOOL.format("code interpreter")),
    "tools[type=programmatic_tool_calling]": (R, _HOSTED_TOOL.format("programs that call tools")),
    "tools[type=image_generation]": (R, _HOSTED_TOOL.format("image generation; `/v1/images/generations` makes images")),
    "tools[type=local_shell]": (R, _HOSTED_TOOL.format("local shell")),
    "tools[type=shell]": (R, _HOSTED_TOOL.format("shell")),
    "tools[type=custom]": (R, "Custom (free-form text or grammar) tools have no chat counterpart yet."),
    "tools[type=namespace]": (R, ("Namespaced tools have no chat counterpart: declare their functions as function "
                                  "tools.")),
    "tools[type=tool_search]": (R, _HOSTED_TOOL.format("tool search")),
    "tools[type=web_search_preview]": (R, _HOSTED_TOOL.format("web search")),
    "tools[type=web_search_preview_2025_03_11]": (R, _HOSTED_TOOL.format("web search")),
    "tools[type=apply_patch]": (R, _HOSTED_TOOL.format("apply patch")),
    # ---- tool_choice ----
    "tool_choice=none": (H, "Passed on as chat's `tool_choice` `none`: the model calls no tool."),
    "tool_choice=auto": (H, "Passed on as chat's `tool_choice` `auto`: the model decides."),
    "tool_choice=required": (H, "Passed on as chat's `tool_choice` `required`: the model calls at least one tool."),
    "tool_choice[type=allowed_tools]": (R, ("Not yet: it could be honoured by passing on only the allowed tools, with "
                                            "mode auto or required.")),
    "tool_choice[type=file_search]": (R, _HOSTED_CHOICE),
    "tool_choice[type=web_search_preview]": (R, _HOSTED_CHOICE),
    "tool_choice[type=computer]": (R, _HOSTED_CHOICE),
    "tool_choice[type=computer_use_preview]": (R, _HOSTED_CHOICE),
    "tool_choice[type=computer_use]": (R, _HOSTED_CHOICE),
    "tool_choice[type=web_search_preview_2025_03_11]": (R, _HOSTED_CHOICE),
    "tool_choice[type=image_generation]": (R, _HOSTED_CHOICE),
    "tool_choice[type=code_interpreter]": (R, _HOSTED_CHOICE),
    "tool_choice[type=function]": (H, "Passed on as chat's named `tool_choice`: the model calls that function."),
    "tool_choice[type=mcp]": (R, _HOSTED_CHOICE),
    "tool_choice[type=custom]": (R, "Names a custom tool, and custom tools are refused."),
    "tool_choice[type=programmatic_tool_calling]": (R, _HOSTED_CHOICE),
    "tool_choice[type=apply_patch]": (R, _HOSTED_CHOICE),
    "tool_choice[type=shell]": (R, _HOSTED_CHOICE),
    # ---- include ----
    "include=file_search_call.results": (I, _HOSTED_INCLUDE),
    "include=web_search_call.results": (I, _HOSTED_INCLUDE),
    "include=web_search_call.action.sources": (I, _HOSTED_INCLUDE),
    "include=message.input_image.image_url": (I, ("Input items are never returned (nothing is stored), so there are no"
                                                  " input image URLs to include.")),
    "include=computer_call_output.output.image_url": (I, _HOSTED_INCLUDE),
    "include=code_interpreter_call.outputs": (I, _HOSTED_INCLUDE),
    "include=reasoning.encrypted_content": (I, ("Nothing is encrypted: reasoning items carry their text, and replayed "
                                                "ones are dropped from the prompt.")),
    "include=message.output_text.logprobs": (H, ("Chat's `logprobs` is turned on: each `output_text` part and text "
                                                 "delta carries its tokens' log probabilities.")),
    # ---- input items, by type ----
    "input[type=message]": (H, "A chat message of the same role, its content translated by part type below."),
    "input[type=message].role": (H, "The chat message's role (`user`, `assistant`, `system` or `developer`)."),
    "input[type=message].content": (H, "A string, or parts translated by type below."),
    "input[type=message].phase": (I, ("OpenAI's commentary or final-answer label has no place in open models' chat "
                                      "templates.")),
    "input[type=message].status": (I, _REPLAY_STATUS),
    "input[type=message].id": (I, _NOT_STORED_ID),
    "input.content[type=input_text]": (H, "A chat `text` part."),
    "input.content[type=input_text].text": (H, "The chat part's text."),
    "input.content[type=input_text].prompt_cache_breakpoint": (I, _NO_CACHE_SETTINGS),
    "input.content[type=input_image]": (H, "A chat `image_url` part."),
    "input.content[type=input_image].image_url": (H, ("The chat part's `image_url.url`, under the media policy: "
                                                      "`data:` URLs always, http(s) only of the allowed domains.")),
    "input.content[type=input_image].file_id": (R, ("Files are not stored here: send the image as `image_url` (a "
                                                    "`data:` URL will do).")),
    "input.content[type=input_image].detail": (I, ("vLLM reads an image as the model's processor sizes it; no detail "
                                                   "level can be chosen.")),
    "input.content[type=input_image].prompt_cache_breakpoint": (I, _NO_CACHE_SETTINGS),
    "input.content[type=input_file]": (R, "File inputs (PDFs and the like) are not read here."),
    "input.content[type=output_text]": (H, "The text of a replayed assistant message."),
    "input.content[type=refusal]": (H, "A replayed assistant refusal: chat's `refusal` part."),
    "input[type=file_search_call]": (R, _HOSTED_ITEM.format("file search")),
    "input[type=computer_call]": (R, _HOSTED_ITEM.format("computer use")),
    "input[type=computer_call_output]": (R, _HOSTED_ITEM.format("computer use")),
    "input[type=web_search_call]": (R, _HOSTED_ITEM.format("web search")),
    "input[type=function_call]": (H, ("A tool call of an assistant message; consecutive calls join one assistant "
                                      "message.")),
    "input[type=function_call].id": (I, _NOT_STORED_ID),
    "input[type=function_call].call_id": (H, "The chat tool call's `id`, which its output's `call_id` names."),
    "input[type=function_call].caller": (I, _CALLER),
    "input[type=function_call].namespace": (R, _NAMESPACE),
    "input[type=function_call].name": (H, "The chat tool call's `function.name`."),
    "input[type=function_call].arguments": (H, "The chat tool call's `function.arguments`."),
    "input[type=function_call].status": (I, _REPLAY_STATUS),
    "input[type=function_call_output]": (H, "A chat `tool` message answering the call its `call_id` names."),
    "input[type=function_call_output].id": (I, _NOT_STORED_ID),
    "input[type=function_call_output].call_id": (H, "The chat tool message's `tool_call_id`."),
    "input[type=function_call_output].output": (H, ("The chat tool message's content: a string, or parts by type "
                                                    "below.")),
    "input[type=function_call_output].name": (I, ("The call it answers is named by `call_id`; chat tool messages carry"
                                                  " no name.")),
    "input[type=function_call_output].namespace": (R, _NAMESPACE),
    "input[type=function_call_output].caller": (I, _CALLER),
    "input[type=function_call_output].status": (I, _REPLAY_STATUS),
    "input.output[type=input_text]": (H, "Text of the chat tool message."),
    "input.output[type=input_image]": (R, ("Chat templates render a tool's answer as text: an image in it has no place"
                                           " in the prompt.")),
    "input.output[type=input_file]": (R, "File inputs (PDFs and the like) are not read here."),
    "input[type=tool_search_call]": (R, _HOSTED_ITEM.format("tool search")),
    "input[type=tool_search_output]": (R, _HOSTED_ITEM.format("tool search")),
    "input[type=additional_tools]": (R, _HOSTED_ITEM.format("tool search")),
    "input[type=reasoning]": (I, ("Replayed reasoning is accepted and dropped from the prompt, as chat templates drop "
                                  "past reasoning.")),
    "input[type=compaction]": (R, ("A compaction summary is OpenAI's encrypted context, and compaction is not done "
                                   "here.")),
    "input[type=image_generation_call]": (R, _HOSTED_ITEM.format("image generation")),
    "input[type=code_interpreter_call]": (R, _HOSTED_ITEM.format("code interpreter")),
    "input[type=local_shell_call]": (R, _HOSTED_ITEM.format("local shell")),
    "input[type=local_shell_call_output]": (R, _HOSTED_ITEM.format("local shell")),
    "input[type=shell_call]": (R, _HOSTED_ITEM.format("shell")),
    "input[type=shell_call_output]": (R, _HOSTED_ITEM.format("shell")),
    "input[type=apply_patch_call]": (R, _HOSTED_ITEM.format("apply patch")),
    "input[type=apply_patch_call_output]": (R, _HOSTED_ITEM.format("apply patch")),
    "input[type=mcp_list_tools]": (R, _HOSTED_ITEM.format("MCP")),
    "input[type=mcp_approval_request]": (R, _HOSTED_ITEM.format("MCP")),
    "input[type=mcp_approval_response]": (R, _HOSTED_ITEM.format("MCP")),
    "input[type=mcp_call]": (R, _HOSTED_ITEM.format("MCP")),
    "input[type=custom_tool_call_output]": (R, _HOSTED_ITEM.format("custom tools")),
    "input[type=custom_tool_call]": (R, _HOSTED_ITEM.format("custom tools")),
    "input[type=compaction_trigger]": (R, "Compaction is not done here."),
    "input[type=item_reference]": (R, "It names a stored item, and nothing is stored: send the item itself."),
    "input[type=program]": (R, _HOSTED_ITEM.format("programmatic tool calling")),
    "input[type=program_output]": (R, _HOSTED_ITEM.format("programmatic tool calling")),
}
