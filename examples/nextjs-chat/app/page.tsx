"use client";

import { FormEvent, useState } from "react";
import { useCloudachStream } from "./use-cloudach-stream";

export default function Chat() {
  const { response, loading, error, send } = useCloudachStream();
  const [prompt, setPrompt] = useState("");

  function submit(event: FormEvent) {
    event.preventDefault();
    if (!loading) void send(prompt);
  }

  return (
    <main>
      <h1>Cloudach streaming chat</h1>
      <form onSubmit={submit}>
        <textarea
          aria-label="Prompt"
          placeholder="Ask something…"
          rows={4}
          value={prompt}
          onChange={(event) => setPrompt(event.target.value)}
        />
        <button type="submit" disabled={loading}>
          {loading ? "Streaming…" : "Send"}
        </button>
      </form>
      {loading && <p role="status" aria-label="Loading">Waiting for tokens…</p>}
      {error && <p role="alert">{error}</p>}
      <output aria-label="Response" aria-busy={loading}>{response}</output>
    </main>
  );
}
