# The streaming guide's FastAPI example (a proxy route over AsyncOpenAI); base URL and model adapted.
import os
from openai import AsyncOpenAI

client = AsyncOpenAI(
    base_url=os.environ["CLOUDACH_BASE_URL"],
    api_key=os.environ["CLOUDACH_API_KEY"],
)

# FastAPI example
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

app = FastAPI()

@app.get("/chat")
async def chat(prompt: str):
    async def generate():
        stream = await client.chat.completions.create(
            model=os.environ["CLOUDACH_MODEL"],
            messages=[{"role": "user", "content": prompt}],
            stream=True,
        )
        async for chunk in stream:
            delta = chunk.choices[0].delta.content or ""
            if delta:
                yield delta

    return StreamingResponse(generate(), media_type="text/plain")
