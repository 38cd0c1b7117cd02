// What the guide's route leaves out and a public page needs: a bounded request body, a prompt
// that is there, one streaming answer at a time per browser session (and a bound over all of
// them), and failures answered as JSON in OpenAI's error shape, which the page shows.
import { APIConnectionError, APIError } from "openai";
import type { ChatCompletionChunk } from "openai/resources/chat/completions";
import type { Stream } from "openai/streaming";
import { NextRequest, NextResponse } from "next/server";
import { SESSION_COOKIE } from "../../../lib/session";

export const MAX_BODY_BYTES = 64 * 1024;
const MAX_STREAMS = positive(process.env.CHAT_MAX_STREAMS) ?? 32;

function positive(setting: string | undefined): number | undefined {
  const value = Number(setting);
  return Number.isInteger(value) && value > 0 ? value : undefined;
}

export function failure(status: number, message: string, param: string | null = null,
                        code: string | null = null, headers: Record<string, string> = {},
                        type?: string): NextResponse {
  type ??= status === 429 ? "rate_limit_error" : status >= 500 ? "server_error" : "invalid_request_error";
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
}

const sessions = new Set<string>();
let streams = 0;

/** A streaming slot for the request's browser session, or the 429 to send instead. A request
 *  without the session cookie (not from the page) counts only against the bound over all. */
export function admit(req: NextRequest): Slot | NextResponse {
  const session = req.cookies.get(SESSION_COOKIE)?.value;
  if (session && sessions.has(session)) {
    return failure(429, "An answer is still streaming in this browser session: wait for it to finish.",
                   null, "concurrent_requests");
  }
  if (streams >= MAX_STREAMS) {
    return failure(429, "This app is streaming as many answers as it allows: try again shortly.",
                   null, "concurrent_requests", { "Retry-After": "1" });
  }
  if (session) sessions.add(session);
  streams += 1;
  let held = true;
  return {
    release() {
      if (!held) return;
      held = false;
      streams -= 1;
      if (session) sessions.delete(session);
    },
  };
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

/** Thrown for a setting the server lacks, so the SDK never falls back to OPENAI_API_KEY. */
export class MissingSetting extends Error {}

export function setting(name: string): string {
  const value = process.env[name];
  if (!value) throw new MissingSetting(`${name} is not set on the server.`);
  return value;
}

interface CloudachError {
  message?: string;
  type?: string;
  param?: string | null;
  code?: string | null;
}

/** The answer to a request Cloudach refused or failed before its first token: its own 400 or
 *  429 passed on (its message, type, param and code), its error event's message as a 502, any
 *  other refusal a 502 that says no more (a wrong key or model is the app's fault, and the
 *  server's log has the details); 500 when the app lacks its key. */
export function upstreamFailure(error: unknown): NextResponse {
  console.error("chat request failed:", error instanceof Error ? error.message : String(error));
  if (error instanceof MissingSetting) return failure(500, error.message);
  if (error instanceof APIConnectionError) {  // no answer at all: refused connection, timeout
    return failure(502, "Cloudach could not be reached.", null, "upstream_unavailable");
  }
  if (!(error instanceof APIError)) {  // an answer that could not be read
    return failure(502, "Cloudach's answer could not be read.", null, "upstream_error");
  }
  const body = (error.error ?? {}) as CloudachError;
  const message = body.message ?? error.message;
  if (error.status === 400 || error.status === 429) {
    const waits: Record<string, string> = {};
    for (const name of ["retry-after", "retry-after-ms"]) {
      const wait = error.headers?.get(name);
      if (wait) waits[name] = wait;
    }
    return failure(error.status, message, body.param ?? null, body.code ?? null, waits, body.type);
  }
  if (!error.status) return failure(502, message, null, body.code ?? "upstream_error");  // its error event
  return failure(502, `Cloudach refused the app's request (${error.status}): see the server's log.`,
                 null, "upstream_error");
}
