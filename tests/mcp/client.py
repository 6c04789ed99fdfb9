"""Drives `homelab-deploy mcp` with the official MCP Python SDK, as an
independent client would.

Usage: client.py COMMAND [ARG...] < steps.json

Each step is {"list_tools": true} or {"call": NAME, "arguments": {...}}.
Prints one JSON object with a result per step.
"""

import asyncio
import json
import os
import sys

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client


def content_text(result):
    return "\n".join(block.text for block in result.content if getattr(block, "type", "") == "text")


async def main():
    command, *args = sys.argv[1:]
    steps = json.load(sys.stdin)
    params = StdioServerParameters(command=command, args=args, env=dict(os.environ))
    results = []
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            info = await session.initialize()
            results.append({"server": info.server_info.name, "protocol": info.protocol_version})
            for step in steps:
                if step.get("list_tools"):
                    listed = await session.list_tools()
                    results.append({"tools": sorted(tool.name for tool in listed.tools)})
                    continue
                progress = []

                async def on_progress(value, total, message):
                    progress.append({"progress": value, "total": total, "message": message})

                try:
                    result = await session.call_tool(
                        step["call"], step.get("arguments", {}), progress_callback=on_progress
                    )
                except Exception as error:  # a protocol error, as opposed to a tool error
                    results.append({"protocol_error": str(error)})
                    continue
                results.append(
                    {
                        "is_error": bool(result.is_error),
                        "text": content_text(result),
                        "structured": result.structured_content,
                        "progress": progress,
                    }
                )
    print(json.dumps(results))


asyncio.run(main())
