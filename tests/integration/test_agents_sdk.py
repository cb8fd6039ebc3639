"""
The OpenAI Agents SDK (C{openai-agents}) running an agent with a function
tool through the running daemon, on the Responses API, to a backend that
speaks only chat completions and to Claude (both translated): the model
calls the tool, the SDK runs it and sends its output back, and the
agent's final answer quotes it.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.conftest import Gateway, agents_gateway_ini

pytestmark = pytest.mark.integration

agents = pytest.importorskip("agents")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, chat_and_claude):
    daemon = Gateway(tmp_path_factory.mktemp("gateway"), agents_gateway_ini(*chat_and_claude))
    yield daemon
    daemon.stop()


@pytest.mark.parametrize("model", ["selfhosted", "claude"])
def test_an_agent_runs_its_function_tool_through_the_gateway(gateway, model):
    from openai import AsyncOpenAI

    asked = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return f"Sunny in {city}"

    async def run() -> str:
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="gateway-key", max_retries=0)
        agent = agents.Agent(
            name="weather", instructions="Answer with the weather.", tools=[get_weather],
            model=agents.OpenAIResponsesModel(model=model, openai_client=client),
        )
        result = await agents.Runner.run(agent, "What is the weather in Paris?", run_config=agents.RunConfig(tracing_disabled=True))
        await client.close()
        return result.final_output

    answer = asyncio.run(run())
    assert asked == ["Paris"]
    assert answer == "The tool said: Sunny in Paris"
