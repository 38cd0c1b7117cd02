// The streaming guide's Next.js App Router route (route.ts), changed in base URL, key and model,
// which come from the server's environment, and where a comment starts "Changed" or "Added"
// (README.md says why for each).
import OpenAI from "openai";
import { NextRequest } from "next/server";
import { admit, readPrompt, setting, untilText, upstreamFailure } from "./guard";

// Changed: the guide makes its client when the module loads, and `next build` loads this module
// to collect page data, where the SDK throws if CLOUDACH_API_KEY is not set. Made on first use;
// and without the key it fails rather than let the SDK fall back to OPENAI_API_KEY.
let client: OpenAI | undefined;
function cloudach(): OpenAI {
  client ??= new OpenAI({
    baseURL: process.env.CLOUDACH_BASE_URL ?? "https://api.cloudach.com/v1",
    apiKey: setting("CLOUDACH_API_KEY"),
  });
  return client;
}

export async function POST(req: NextRequest) {
  // Changed: the guide reads { prompt } with req.json(); this reads at most 64 KiB, refuses an
  // empty prompt, and lets a browser session stream one answer at a time (each a 4xx JSON error).
  const prompt = await readPrompt(req);
  if (prompt instanceof Response) return prompt;
  const slot = admit(req);
  if (slot instanceof Response) return slot;

  let stream, first, rest;
  try { // Added: a failure before the first token answers as JSON (upstreamFailure)
    stream = await cloudach().chat.completions.create(
      {
        model: process.env.CLOUDACH_MODEL ?? "llama3-8b",
        messages: [{ role: "user", content: prompt }],
        stream: true,
      },
      { signal: req.signal }, // Added: a browser that goes away stops the answer upstream too
    );
    // Added: read up to the first text, so that a failure before any token (the model
    // restarting) is answered that way too, not as an empty reply once the stream has begun.
    [first, rest] = await untilText(stream);
  } catch (error) {
    slot.release();
    return upstreamFailure(error);
  }

  // Pipe Cloudach SSE directly to the browser
  const encoder = new TextEncoder();
  let cancelled = false; // Added
  const readable = new ReadableStream({
    async start(controller) {
      try {
        if (first) controller.enqueue(encoder.encode(first)); // Added: the text read above
        for await (const chunk of rest) { // Changed: the chunks after it
          const delta = chunk.choices[0]?.delta?.content ?? "";
          if (delta) controller.enqueue(encoder.encode(delta));
        }
        controller.close();
      } catch (error) {
        // Added: a failure mid-answer (Cloudach's error event, a dropped connection) cuts the
        // response off, so the browser's read fails instead of the text looking complete.
        if (cancelled) return; // the browser left: nothing failed
        console.error("chat stream failed:", error instanceof Error ? error.message : error);
        controller.error(new Error("the answer from Cloudach failed mid-way"));
      } finally {
        slot.release(); // Added
      }
    },
    cancel() {
      // Added: the browser stopped reading
      cancelled = true;
      stream.controller.abort();
      slot.release();
    },
  });

  return new Response(readable, {
    headers: { "Content-Type": "text/plain; charset=utf-8" },
  });
}
