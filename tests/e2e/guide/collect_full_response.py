# The streaming guide's "Collecting the full response"; the client is the one of "Basic streaming".
import os
from openai import OpenAI

client = OpenAI(
    base_url=os.environ["CLOUDACH_BASE_URL"],
    api_key=os.environ["CLOUDACH_API_KEY"],
)

chunks = []

stream = client.chat.completions.create(
    model=os.environ["CLOUDACH_MODEL"],
    messages=[{"role": "user", "content": "Explain recursion briefly."}],
    stream=True,
)

for chunk in stream:
    delta = chunk.choices[0].delta.content or ""
    chunks.append(delta)
    print(delta, end="", flush=True)

full_text = "".join(chunks)
print(f"\n\nTotal characters: {len(full_text)}")
