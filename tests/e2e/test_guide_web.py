"""The streaming guide's web examples, the Next.js App Router route and the React hook, in a real
Next.js app (examples/nextjs-chat/): built by `next build` with no key in its environment, served
by `next start` against the stack, and driven in Debian's Chromium (headless) by Playwright. Each
test asserts what a person at the page sees, and that no request from the browser carries the API
key. Screenshots go to build/test-output/ (CLOUDACH_TEST_OUTPUT). The test that kills Triton comes
last."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time

from dataclasses import dataclass

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tools.launcher.ports import free_ports
from tests.e2e.conftest import REPO, Output, Stack, launch_stack, npm_ci

APP = REPO / "examples" / "nextjs-chat"
CHROMIUM = pathlib.Path(os.environ.get("CLOUDACH_CHROMIUM", "/usr/bin/chromium"))
OUTPUT = pathlib.Path(os.environ.get("CLOUDACH_TEST_OUTPUT", REPO / "build" / "test-output"))
#: Without the background-networking flags Chromium keeps dialling Google's hosts, which this
#: closed network refuses; as root it needs --no-sandbox.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
ORG = "web-app"
POEM = "Write a poem about the ocean."
#: At the model's default sampling a long answer (tens of seconds): time to act mid-answer.
COUNTING = "Write the numbers from 1 to 500 separated by commas."
HELLO = "Say hello."
#: Under the app's 64 KiB, over the model's 2,048 tokens of context.
OVER_CONTEXT = "hello " * 5_000

# The first test also starts the stack and builds the app (npm ci, next build: two minutes here).
pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from launch_stack(tmp_path_factory)


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    return stack.create_key(ORG)


@dataclass
class App:
    origin: str
    log: Output


@pytest.fixture(scope="module")
def app(stack: Stack, key: str):
    """The app built with nothing of Cloudach in its environment (the route must not need its key
    at build time), then started with the guide's three variables. What it logged must hold
    neither the key nor a prompt."""
    npm_ci(APP)
    bare = {name: value for name, value in os.environ.items() if not name.startswith(("CLOUDACH_", "OPENAI_"))}
    built = subprocess.run(["npm", "run", "build"], cwd=APP, env=bare, capture_output=True, text=True, timeout=240)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (port,) = free_ports(1)
    next_bin = APP / "node_modules" / ".bin" / "next"
    server = subprocess.Popen([str(next_bin), "start", "-H", "127.0.0.1", "-p", str(port)], cwd=APP,
                              env={**stack.env(key), "NEXT_TELEMETRY_DISABLED": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    log = Output(server)
    try:
        log.wait_for("Ready in", 60)
        yield App(f"http://127.0.0.1:{port}", log)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    logged = log.drained()
    assert key not in logged, "the app logged its API key"
    assert not [p for p in (POEM, COUNTING, HELLO, OVER_CONTEXT[:60]) if p in logged], "the app logged a prompt"


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.exists(), f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium package"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


#: Runs in the page: on every animation frame, notes the response's length whenever it or the
#: loading state changed, and whether the text so far still starts with the text before it.
RECORD_FRAMES = """() => {
  const output = document.querySelector("output");
  const frames = (window.__frames = []);
  let last = null, frame = 0;
  const tick = () => {
    const text = output.textContent, loading = document.querySelector('[aria-label="Loading"]') !== null;
    if (!last || text !== last.text || loading !== last.loading) {
      frames.push({ frame, length: text.length, loading, extends: !last || text.startsWith(last.text) });
      last = { text, loading };
    }
    frame += 1;
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
}"""


class Chat:
    """The example's page in one browser tab: what a person types, presses and sees."""

    def __init__(self, page: Page, origin: str):
        self.page = page
        page.goto(origin)
        self.prompt = page.get_by_label("Prompt")
        self.button = page.get_by_role("button")
        self.loading = page.get_by_role("status", name="Loading")
        self.alert = page.locator('p[role="alert"]')  # Next.js's route announcer is an alert too
        self.response = page.get_by_label("Response")

    def send(self, prompt: str):
        """Types prompt and presses send; returns the route's answer (its status and headers), or
        None when the request failed without one."""
        self.prompt.fill(prompt)
        with self.page.expect_request(lambda r: r.url.endswith("/api/chat")) as sent:
            self.button.click()
        return sent.value.response()

    def answering(self, prompt: str, chars: int = 20, attempts: int = 5) -> str:
        """Sends prompt until an answer is streaming with at least chars characters shown (the
        model samples: now and then it answers in a few words); returns the text so far."""
        for _ in range(attempts):
            assert self.send(prompt).status == 200
            deadline = time.monotonic() + 60
            while self.loading.is_visible() and time.monotonic() < deadline:
                if len(text := self.response.text_content()) >= chars:
                    return text
                time.sleep(0.1)
            self.finished()
        raise AssertionError(f"{attempts} answers in a row ended before {chars} characters")

    def finished(self, timeout_s: float = 120) -> str:
        """Waits for the loading state to end; returns the response text."""
        expect(self.loading).to_be_hidden(timeout=timeout_s * 1000)
        expect(self.button).to_be_enabled()
        return self.response.text_content()

    def shot(self, name: str) -> pathlib.Path:
        OUTPUT.mkdir(parents=True, exist_ok=True)
        path = OUTPUT / f"nextjs-chat-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def test_the_page_streams_an_answer_frame_by_frame_and_the_key_stays_on_the_server(
        app: App, browser: Browser, stack: Stack, key: str):
    context = browser.new_context()
    requests, responses = [], []
    context.on("request", lambda request: requests.append(request))
    context.on("response", lambda response: responses.append(response))
    chat = Chat(context.new_page(), app.origin)
    chat.page.evaluate(RECORD_FRAMES)
    answer = chat.send(POEM)
    assert answer.status == 200 and answer.headers["content-type"] == "text/plain; charset=utf-8"
    text = chat.finished()
    expect(chat.alert).to_have_count(0)
    assert len(text.strip()) > 20, text
    assert chat.shot("finished").stat().st_size > 0

    frames = chat.page.evaluate("window.__frames")
    assert all(f["extends"] for f in frames), "the text was replaced, not appended to"
    assert frames[0]["length"] == 0 and frames[-1] == {**frames[-1], "length": len(text), "loading": False}
    assert next(f for f in frames if f["loading"])["length"] == 0, "the loading state came after the text"
    growing = [f for f in frames if f["loading"] and 0 < f["length"] < len(text)]
    assert len(growing) >= 10, f"the text did not grow over several frames: {frames}"
    assert growing[0]["length"] < len(text) / 2 and growing[-1]["frame"] > growing[0]["frame"]

    # The key never reaches the browser: not in a request it sent, nor in what it was sent.
    assert requests and all(r.url.startswith(app.origin + "/") for r in requests), [r.url for r in requests]
    for request in requests:
        sent = request.url + repr(request.all_headers()) + (request.post_data or "")
        assert key not in sent, request.url
    for response in responses:
        if response.request.resource_type in ("document", "script"):
            assert key.encode() not in response.body(), response.url
    assert key not in repr(context.cookies())
    context.close()

    # The answer is billed to the app's key, as completed.
    rows = stack.await_ledger("billing_svc has no record of the page's request",
                              "outcome, completion_tokens", "organization = ?", ORG)
    assert rows[0][0] == "completed" and rows[0][1] > 5


def test_bad_input_gets_a_clear_error_on_the_page_and_nothing_hangs(app: App, browser: Browser, stack: Stack):
    context = browser.new_context()
    chat = Chat(context.new_page(), app.origin)

    def refused(answer, status: int, shown: str) -> dict:
        error = answer.json()["error"]
        assert answer.status == status and set(error) == {"message", "type", "param", "code"}
        expect(chat.alert).to_have_text(error["message"])
        expect(chat.alert).to_contain_text(shown)
        assert chat.finished(10) == ""
        return error

    refused(chat.send(""), 400, "The prompt is empty")
    refused(chat.send("   \n "), 400, "The prompt is empty")
    refused(chat.send("x" * 1_000_000), 413, "The prompt is too long")
    # Under the app's limit, over the model's: Cloudach's own 400 and its message, passed on.
    error = refused(chat.send(OVER_CONTEXT), 400, "This model's maximum context length is 2048 tokens")
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error", "messages", "context_length_exceeded")
    assert error["message"].startswith("This model's")  # Cloudach's words, as Cloudach sent them

    # A second tab of the same browser session asks while the first is still streaming.
    first = Chat(context.new_page(), app.origin)
    first.answering(COUNTING, chars=60)
    refused(chat.send(HELLO), 429, "still streaming in this browser session")
    expect(first.loading).to_be_visible()
    chat.shot("refused")

    # Closing the first tab ends its answer upstream (billed as cancelled by the client) and frees
    # the session for the second.
    first.page.close()
    deadline = time.monotonic() + 30
    while (answer := chat.send(HELLO)).status == 429:
        assert time.monotonic() < deadline, "the closed tab's answer still holds the session"
        time.sleep(0.5)
    assert answer.status == 200 and chat.finished().strip()
    expect(chat.alert).to_have_count(0)
    stack.await_ledger("the closed tab's answer was not cancelled upstream",
                       "1", "organization = ? AND outcome = 'cancelled_by_client'", ORG)
    assert "chat stream failed" not in app.log.text, "the app logged a closed tab as a failure"
    context.close()


def test_a_killed_triton_leaves_the_partial_answer_and_an_error_on_the_page(
        app: App, browser: Browser, stack: Stack):
    context = browser.new_context()
    chat = Chat(context.new_page(), app.origin)
    before = chat.answering(COUNTING)
    triton = stack.services()["tritonserver"]
    os.kill(triton["pid"], signal.SIGKILL)

    expect(chat.alert).to_contain_text("The answer was cut off", timeout=60_000)
    partial = chat.finished(10)
    assert partial.startswith(before) and partial.strip(), partial
    chat.shot("triton-killed")

    # The launcher restarts Triton; the same page answers again. Until inference_svc sees the new
    # Triton, the route answers with Cloudach's error as JSON, never with an empty reply.
    stack.output.wait_for("tritonserver ready again", 180)
    deadline = time.monotonic() + 60
    while True:
        answer = chat.send(HELLO)
        text = chat.finished()
        if chat.alert.count() == 0:
            break
        assert answer is not None and answer.status == 502, chat.alert.text_content()
        assert time.monotonic() < deadline, chat.alert.text_content()
        time.sleep(1)
    assert text.strip()
    context.close()
