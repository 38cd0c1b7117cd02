// The streaming guide's Next.js App Router route (route.ts) as plain JavaScript: the TypeScript
// annotations are dropped and NextRequest (a Request with extras the route does not use) is the
// standard Request. Adapted: base URL and model.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.CLOUDACH_BASE_URL,
  apiKey: process.env.CLOUDACH_API_KEY,
});

export async function POST(req) {
  const { prompt } = await req.json();

  const stream = await client.chat.completions.create({
    model: process.env.CLOUDACH_MODEL,
    messages: [{ role: "user", content: prompt }],
    stream: true,
  });

  // Pipe Cloudach SSE directly to the browser
  const encoder = new TextEncoder();
  const readable = new ReadableStream({
    async start(controller) {
      for await (const chunk of stream) {
        const delta = chunk.choices[0]?.delta?.content ?? "";
        if (delta) controller.enqueue(encoder.encode(delta));
      }
      controller.close();
    },
  });

  return new Response(readable, {
    headers: { "Content-Type": "text/plain; charset=utf-8" },
  });
}
