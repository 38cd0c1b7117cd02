// The streaming guide's React hook (UI patterns: append tokens to state), changed where a comment
// starts "Changed" or "Added": a request the route refuses, or an answer cut off mid-way, ends the
// loading state with an error to show, instead of leaving the page loading forever.
import { useState } from "react";

export function useCloudachStream() {
  const [response, setResponse] = useState("");
  const [loading, setLoading] = useState(false);
  const [error, setError] = useState(""); // Added

  async function send(prompt: string) {
    setLoading(true);
    setResponse("");
    setError(""); // Added

    let streaming = false; // Added
    try { // Added
      // Stream via your own API route to keep the key server-side
      const res = await fetch("/api/chat", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prompt }),
      });
      if (!res.ok || !res.body) throw new Error(await refusal(res)); // Added
      streaming = true; // Added

      const reader = res.body.getReader();
      const decoder = new TextDecoder();

      while (true) {
        const { value, done } = await reader.read();
        if (done) break;
        // Changed: { stream: true } keeps a character split across two reads whole
        setResponse((prev) => prev + decoder.decode(value, { stream: true }));
      }
    } catch (failure) { // Added
      const reason = failure instanceof Error ? failure.message : String(failure);
      setError(streaming ? `The answer was cut off (${reason}).` : reason);
    } finally {
      setLoading(false);
    }
  }

  return { response, loading, error, send };
}

// Added: the route answers a refusal with {"error": {"message": ...}}.
async function refusal(res: Response): Promise<string> {
  try {
    const { error } = await res.json();
    if (typeof error?.message === "string") return error.message;
  } catch {}
  return `The chat route answered ${res.status} ${res.statusText}.`;
}
