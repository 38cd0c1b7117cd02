# The streaming guide's "Basic streaming" example; only the base URL and the model are adapted.
import os
from openai import OpenAI

client = OpenAI(
    base_url=os.environ["CLOUDACH_BASE_URL"],
    api_key=os.environ["CLOUDACH_API_KEY"],
)

stream = client.chat.completions.create(
    model=os.environ["CLOUDACH_MODEL"],
    messages=[{"role": "user", "content": "Write a poem about the ocean."}],
    stream=True,
)

for chunk in stream:
    delta = chunk.choices[0].delta.content
    if delta:
        print(delta, end="", flush=True)

print()  # newline after stream ends
