// The streaming guide's React hook, verbatim except that useState comes from react-state.mjs.
import { useState } from "./react-state.mjs";

export function useCloudachStream() {
  const [response, setResponse] = useState("");
  const [loading, setLoading] = useState(false);

  async function send(prompt) {
    setLoading(true);
    setResponse("");

    // Stream via your own API route to keep the key server-side
    const res = await fetch("/api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt }),
    });

    const reader = res.body.getReader();
    const decoder = new TextDecoder();

    while (true) {
      const { value, done } = await reader.read();
      if (done) break;
      setResponse((prev) => prev + decoder.decode(value));
    }

    setLoading(false);
  }

  return { response, loading, send };
}
