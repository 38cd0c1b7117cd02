// A forced tool call streamed to the openai npm package's stream helper, which assembles it.
// Prints what the helper saw: the argument fragments and the final message.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.CLOUDACH_BASE_URL,
  apiKey: process.env.CLOUDACH_API_KEY,
  maxRetries: 0,
});

const tools = [{
  type: "function",
  function: {
    name: "get_weather",
    description: "The current weather in a city.",
    parameters: {
      type: "object",
      properties: { city: { type: "string", maxLength: 30 } },
      required: ["city"],
      additionalProperties: false,
    },
  },
}];

const fragments = [];
const stream = client.chat.completions.stream({
  model: process.env.CLOUDACH_MODEL,
  messages: [{ role: "user", content: "What is the weather in Lisbon?" }],
  tools,
  tool_choice: { type: "function", function: { name: "get_weather" } },
  max_tokens: 60,
});
stream.on("tool_calls.function.arguments.delta", (event) => fragments.push(event.arguments_delta));
const completion = await stream.finalChatCompletion();
const choice = completion.choices[0];
console.log(JSON.stringify({ fragments, message: choice.message, finish_reason: choice.finish_reason }));
