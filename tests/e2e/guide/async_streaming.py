# The streaming guide's "Async Python (asyncio)" example; base URL and model adapted, and run.
import asyncio
import os
from openai import AsyncOpenAI

client = AsyncOpenAI(
    base_url=os.environ["CLOUDACH_BASE_URL"],
    api_key=os.environ["CLOUDACH_API_KEY"],
)

async def stream_response(prompt: str) -> str:
    stream = await client.chat.completions.create(
        model=os.environ["CLOUDACH_MODEL"],
        messages=[{"role": "user", "content": prompt}],
        stream=True,
    )

    chunks = []
    async for chunk in stream:
        delta = chunk.choices[0].delta.content or ""
        chunks.append(delta)
        print(delta, end="", flush=True)

    print()
    return "".join(chunks)

if __name__ == "__main__":
    text = asyncio.run(stream_response("Name three primary colors."))
    print(f"returned {len(text)} characters")
