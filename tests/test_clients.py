"""Third-party clients against the live server: LangChain, the OpenAI Agents SDK and LiteLLM.

Each client builds its own requests (its own field names, defaults and extras), so these tests prove that limbic
accepts what real clients send and answers in shapes they parse: forced tool calls whose arguments validate against
the tool's schema, structured output, streaming. Wrappers drop limbic's ``limbic`` extension object, so where a
client does not expose the raw response, monitoring is checked on the server's Prometheus counter of scored
generation tokens instead: it must grow by at least the completion tokens the client reported.

Set ``LIMBIC_TEST_URL`` (a base URL without ``/v1``) to run these against a server that is already running.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from typing import Any, Literal

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

# LiteLLM fetches a model cost map from the internet on import unless told to use its bundled copy.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
CITIES = ("Paris", "London", "Tokyo")
WEATHER_QUESTION = "What is the weather like in Paris today?"
# The schema of a get_weather tool in the OpenAI wire format (what LiteLLM is given as is).
WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": list(CITIES)}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Returns the weather forecast for a city.",
        "parameters": WEATHER_PARAMETERS,
    },
}


@pytest.fixture(scope="module")
def base_url(limbic_url: str) -> str:
    return limbic_url


def generation_tokens_monitored(url: str) -> float:
    """``limbic_tokens_monitored_total{phase="generation", model=MODEL}`` from the server's /metrics."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if (
                sample.name == "limbic_tokens_monitored_total"
                and sample.labels.get("phase") == "generation"
                and sample.labels.get("model") == MODEL
            ):
                return sample.value
    raise AssertionError("no limbic_tokens_monitored_total for the generation phase")


def assert_monitored(url: str, before: float, completion_tokens: int, timeout: float = 5.0) -> None:
    """The generation counter grew by at least ``completion_tokens`` since ``before``.

    Other requests may run on the same server meanwhile, hence "at least"; polled briefly in case the counter is
    updated just after the last byte of the response is sent.
    """
    assert completion_tokens > 0, "the client reported no completion tokens"
    deadline = time.monotonic() + timeout
    while (grown := generation_tokens_monitored(url) - before) < completion_tokens and time.monotonic() < deadline:
        time.sleep(0.1)
    assert grown >= completion_tokens, f"{grown} generation tokens scored for {completion_tokens} generated"


def validate(arguments: str | dict, schema: dict) -> dict:
    """Tool arguments (a JSON string or already parsed) validated against the tool's JSON schema."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, schema)
    return args


# --- LangChain -------------------------------------------------------------------------------------------------


class Forecast(BaseModel):
    """A one-line weather forecast."""

    city: Literal["Paris", "London", "Tokyo"]
    sky: Literal["sunny", "cloudy", "rainy"]
    celsius: int = Field(ge=-30, le=45)


def chat_openai(url: str, max_tokens: int = 64, **kwargs: Any):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=f"{url}/v1",
        api_key="unused",
        model=MODEL,
        temperature=0,
        max_tokens=max_tokens,
        max_retries=0,
        timeout=120,
        **kwargs,
    )


def langchain_weather_tool():
    from langchain_core.tools import tool

    @tool
    def get_weather(city: Literal["Paris", "London", "Tokyo"]) -> str:
        """Returns the weather forecast for a city."""
        return f"Sunny in {city}"

    return get_weather


@pytest.mark.parametrize("tool_choice", ["get_weather", "any", "required"])
def test_langchain_forced_tool_call_validates(base_url: str, tool_choice: str):
    """LangChain's ``bind_tools`` with a tool name (a named choice) or "any"/"required" yields exactly one call
    of that tool, with arguments valid for its schema, and the server scored the generated tokens."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    weather = langchain_weather_tool()
    schema = convert_to_openai_tool(weather)["function"]["parameters"]
    llm = chat_openai(base_url).bind_tools([weather], tool_choice=tool_choice)
    before = generation_tokens_monitored(base_url)
    message = llm.invoke(WEATHER_QUESTION)
    assert len(message.tool_calls) == 1, message
    call = message.tool_calls[0]
    assert call["name"] == "get_weather"
    assert validate(call["args"], schema)["city"] in CITIES
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert_monitored(base_url, before, message.usage_metadata["output_tokens"])


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output_is_a_valid_instance(base_url: str, method: str):
    """``with_structured_output`` (constrained ``response_format`` json_schema, or a forced tool call) returns a
    validated pydantic instance; ``include_raw`` gives the AIMessage, whose usage the monitor counter covers."""
    llm = chat_openai(base_url).with_structured_output(Forecast, method=method, include_raw=True)
    before = generation_tokens_monitored(base_url)
    result = llm.invoke("Give the forecast for Tokyo: sunny, 21 degrees.")
    assert result["parsing_error"] is None, result
    forecast = result["parsed"]
    assert isinstance(forecast, Forecast)
    assert forecast.city in CITIES and -30 <= forecast.celsius <= 45
    assert_monitored(base_url, before, result["raw"].usage_metadata["output_tokens"])


def test_langchain_stream_equals_invoke(base_url: str):
    """At temperature 0 the chunks of ``.stream()`` concatenate to exactly the text of ``.invoke()``; the stream's
    usage (``stream_options.include_usage``) is reported and covered by the monitor counter."""
    llm = chat_openai(base_url, max_tokens=24, stream_usage=True)
    prompt = "Name three colours."
    invoked = llm.invoke(prompt)
    before = generation_tokens_monitored(base_url)
    chunks = list(llm.stream(prompt))
    assert len(chunks) > 2
    streamed = "".join(chunk.content for chunk in chunks)
    assert streamed and streamed == invoked.content
    usage = next(chunk.usage_metadata for chunk in reversed(chunks) if chunk.usage_metadata)
    assert usage["output_tokens"] == invoked.usage_metadata["output_tokens"]
    assert_monitored(base_url, before, usage["output_tokens"])


def test_langchain_responses_api_forced_tool_call(base_url: str):
    """LangChain with ``use_responses_api=True`` (``POST /v1/responses``) and a named tool choice gets one valid
    call of that tool."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    weather = langchain_weather_tool()
    schema = convert_to_openai_tool(weather)["function"]["parameters"]
    llm = chat_openai(base_url, use_responses_api=True).bind_tools([weather], tool_choice="get_weather")
    before = generation_tokens_monitored(base_url)
    message = llm.invoke(WEATHER_QUESTION)
    assert [call["name"] for call in message.tool_calls] == ["get_weather"]
    assert validate(message.tool_calls[0]["args"], schema)["city"] in CITIES
    assert_monitored(base_url, before, message.usage_metadata["output_tokens"])


# --- OpenAI Agents SDK -----------------------------------------------------------------------------------------


def run_weather_agent(base_url: str, model_class: Callable[..., Any]) -> None:
    """Runs an agent forced to call its one tool and stop there; checks the call, the output and monitoring."""
    from agents import Agent, ModelSettings, Runner, ToolCallItem, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # tracing would upload spans to OpenAI: there is no network here
    calls: list[str] = []

    @function_tool
    def get_weather(city: Literal["Paris", "London", "Tokyo"]) -> str:
        """Returns the weather forecast for a city."""
        calls.append(city)
        return f"Sunny in {city}"

    async def run() -> Any:
        async with AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            agent = Agent(
                name="weather",
                instructions="You answer questions about the weather by calling get_weather.",
                model=model_class(model=MODEL, openai_client=client),
                tools=[get_weather],
                model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=64),
                tool_use_behavior="stop_on_first_tool",
            )
            return await Runner.run(agent, WEATHER_QUESTION, max_turns=2)

    before = generation_tokens_monitored(base_url)
    result = asyncio.run(run())
    assert len(calls) == 1 and calls[0] in CITIES
    tool_calls = [item.raw_item for item in result.new_items if isinstance(item, ToolCallItem)]
    assert len(tool_calls) == 1 and tool_calls[0].name == "get_weather"
    assert validate(tool_calls[0].arguments, get_weather.params_json_schema) == {"city": calls[0]}
    assert result.final_output == f"Sunny in {calls[0]}"
    assert_monitored(base_url, before, sum(r.usage.output_tokens for r in result.raw_responses))


def test_agents_chat_completions_model_calls_the_tool(base_url: str):
    """The Agents SDK on ``OpenAIChatCompletionsModel`` with ``tool_choice="required"`` calls its tool once with
    schema-valid arguments and, with ``stop_on_first_tool``, ends with the tool's return value."""
    from agents import OpenAIChatCompletionsModel

    run_weather_agent(base_url, OpenAIChatCompletionsModel)


def test_agents_responses_model_calls_the_tool(base_url: str):
    """The same agent on ``OpenAIResponsesModel`` (``POST /v1/responses``)."""
    from agents import OpenAIResponsesModel

    run_weather_agent(base_url, OpenAIResponsesModel)


# --- LiteLLM ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm() -> Any:
    import litellm

    return litellm


def test_litellm_named_tool_call_validates(base_url: str, litellm: Any):
    """``litellm.completion`` on the ``openai/`` provider with a named tool choice gets one schema-valid call of
    that tool; limbic's extension object survives LiteLLM's response conversion."""
    before = generation_tokens_monitored(base_url)
    response = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=f"{base_url}/v1",
        api_key="unused",
        messages=[{"role": "user", "content": WEATHER_QUESTION}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=64,
        num_retries=0,
        timeout=120,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert validate(call.function.arguments, WEATHER_PARAMETERS)["city"] in CITIES
    assert_monitored(base_url, before, response.usage.completion_tokens)
    # LiteLLM's ModelResponse keeps unknown top-level fields of a non-streamed response as pydantic extras.
    limbic = (response.model_extra or {}).get("limbic")
    assert limbic is not None, "LiteLLM dropped limbic's extension object"
    assert {"desperate", "calm"} <= set(limbic["generation"]) and isinstance(limbic["alerts"], list)


def test_litellm_stream_has_text(base_url: str, litellm: Any):
    """A streamed ``litellm.completion`` yields non-empty text and reports usage covered by the monitor counter."""
    before = generation_tokens_monitored(base_url)
    stream = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=f"{base_url}/v1",
        api_key="unused",
        messages=[{"role": "user", "content": "Name three colours."}],
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        num_retries=0,
        timeout=120,
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text.strip()
    usage = next(chunk.usage for chunk in reversed(chunks) if getattr(chunk, "usage", None))
    assert_monitored(base_url, before, usage.completion_tokens)
