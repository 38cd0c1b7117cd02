# The streaming guide's "Error handling" example. Adapted: base URL and model; the guide's snippet
# uses os without importing it; the prompt may be given as the first argument (default "Hello!").
import os
import sys
import time
from openai import OpenAI, APIStatusError, APIConnectionError

client = OpenAI(
    base_url=os.environ["CLOUDACH_BASE_URL"],
    api_key=os.environ["CLOUDACH_API_KEY"],
)

RETRYABLE = {429, 500, 502, 503}

def stream_with_retry(messages, model=os.environ["CLOUDACH_MODEL"], max_retries=3):
    for attempt in range(max_retries):
        try:
            stream = client.chat.completions.create(
                model=model,
                messages=messages,
                stream=True,
            )
            collected = []
            for chunk in stream:
                delta = chunk.choices[0].delta.content or ""
                collected.append(delta)
                print(delta, end="", flush=True)
            print()
            return "".join(collected)

        except APIStatusError as e:
            if e.status_code not in RETRYABLE or attempt == max_retries - 1:
                raise
            retry_after = e.response.headers.get("Retry-After")
            wait = float(retry_after) if retry_after else 2 ** attempt
            print(f"\nRetrying in {wait}s (attempt {attempt + 1})...")
            time.sleep(wait)

        except APIConnectionError:
            # TCP reset or proxy timeout — retry immediately
            if attempt == max_retries - 1:
                raise
            print(f"\nConnection error, retrying...")

result = stream_with_retry([{"role": "user", "content": sys.argv[1] if len(sys.argv) > 1 else "Hello!"}])
