// What the guide's route leaves out and a public page needs: a bounded request body, a prompt
// that is there, one streaming answer at a time per browser session (and a bound over all of
// them), and failures answered as JSON in OpenAI's error shape, which the page shows.
import { APIConnectionError, APIError } from "openai";
import type { ChatCompletionChunk } from "openai/resources/chat/completions";
import type { Stream } from "openai/streaming";
import { NextRequest, NextResponse } from "next/server";

export const MAX_BODY_BYTES = 64 * 1024;
const MAX_STREAMS = Number(process.env.CHAT_MAX_STREAMS ?? 32);
const SESSION_COOKIE = "cloudach_chat";

export function failure(status: number, message: string, param: string | null = null,
                        code: string | null = null, headers: Record<string, string> = {}): NextResponse {
  const type = status === 429 ? "rate_limit_error" : status >= 500 ? "server_error" : "invalid_request_error";
  return NextResponse.json({ error: { message, type, param, code } }, { status, headers });
}

function tooLarge(): NextResponse {
  return failure(413, `The prompt is too long: this app takes at most ${MAX_BODY_BYTES / 1024} KiB.`,
                 "prompt", "request_too_large");
}

/** The request's prompt, or the 4xx answer to send instead. */
export async function readPrompt(req: NextRequest): Promise<string | NextResponse> {
  if (Number(req.headers.get("content-length") ?? 0) > MAX_BODY_BYTES) return tooLarge();
  const body = await readCapped(req, MAX_BODY_BYTES);
  if (body === undefined) return tooLarge();
  let prompt: unknown;
  try {
    prompt = (JSON.parse(body) as { prompt?: unknown })?.prompt;
  } catch {
    return failure(400, 'Send a JSON body: {"prompt": "..."}.');
  }
  if (typeof prompt !== "string") return failure(400, 'Send a JSON body: {"prompt": "..."}.', "prompt");
  if (!prompt.trim()) return failure(400, "The prompt is empty: type something to send.", "prompt");
  return prompt;
}

/** The body as text, or undefined past limit bytes (a chunked upload has no content-length). */
async function readCapped(req: NextRequest, limit: number): Promise<string | undefined> {
  if (!req.body) return "";
  const reader = req.body.getReader();
  const pieces: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel();
      return undefined;
    }
    pieces.push(value);
  }
  return Buffer.concat(pieces).toString("utf8");
}

export interface Slot {
  release(): void;
  headers: Record<string, string>;
}

const streaming = new Set<string>();

/** A streaming slot for the request's browser session, or the 429 to send instead. */
export function admit(req: NextRequest): Slot | NextResponse {
  const known = req.cookies.get(SESSION_COOKIE)?.value;
  if (known && streaming.has(known)) {
    return failure(429, "An answer is still streaming in this browser session: wait for it to finish.",
                   null, "concurrent_requests");
  }
  if (streaming.size >= MAX_STREAMS) {
    return failure(429, "This app is streaming as many answers as it allows: try again shortly.",
                   null, "concurrent_requests", { "Retry-After": "1" });
  }
  const session = known ?? crypto.randomUUID();
  streaming.add(session);
  let held = true;
  return {
    release() {
      if (held) streaming.delete(session);
      held = false;
    },
    headers: known ? {} : { "Set-Cookie": sessionCookie(session, req.nextUrl.protocol === "https:") },
  };
}

function sessionCookie(session: string, secure: boolean): string {
  return `${SESSION_COOKIE}=${session}; Path=/api/chat; HttpOnly; SameSite=Strict${secure ? "; Secure" : ""}`;
}

/** Reads the stream up to its first text ("" if it ends first); returns that text and the
 *  chunks after it. */
export async function untilText(stream: Stream<ChatCompletionChunk>):
    Promise<[string, AsyncIterable<ChatCompletionChunk>]> {
  const chunks = stream[Symbol.asyncIterator]();
  const rest = { [Symbol.asyncIterator]: () => chunks };
  for (;;) {
    const { value, done } = await chunks.next();
    const text = done ? "" : (value.choices[0]?.delta?.content ?? "");
    if (done || text) return [text, rest];
  }
}

/** The answer to a request Cloudach refused or failed before its first token: its own 400 or
 *  429 passed on, anything else a 502 (a wrong key or model is the app's fault, not the
 *  browser's); 500 when the app has no key. */
export function upstreamFailure(error: unknown): NextResponse {
  const message = error instanceof Error ? error.message : String(error);
  console.error("chat request failed:", message);
  const code = error instanceof APIError && typeof error.code === "string" ? error.code : null;
  if (error instanceof APIConnectionError) {  // no answer at all: refused connection, timeout
    return failure(502, `Cloudach could not be reached: ${message}`, null, "upstream_unavailable");
  }
  if (error instanceof APIError && (error.status === 400 || error.status === 429)) {
    const retry = error.headers?.get("retry-after");
    return failure(error.status, message, null, code, retry ? { "Retry-After": retry } : {});
  }
  if (error instanceof APIError && error.status) {
    return failure(502, `Cloudach answered ${error.status}: ${message}`, null, code ?? "upstream_error");
  }
  if (error instanceof APIError) {  // the stream's error event, before any token
    return failure(502, message, null, code ?? "upstream_error");
  }
  return failure(500, `The app is misconfigured: ${message}`);  // the SDK's missing-key error
}
